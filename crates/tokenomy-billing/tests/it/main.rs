//! The charging path against a real SQLite file (and a real PostgreSQL server when
//! `TOKENOMY_TEST_POSTGRES_URL` is set): first run, keys, holds, settlement, receipts that
//! verify offline, and the log surviving a restart.

use tokenomy_billing::{keys, Billing, BillingError, ChargeRequest, FirstRun, OpenOptions, Served, FIRST_RUN_FILE};
use tokenomy_core::Usage;
use tokenomy_ledger::{LedgerStore, TREASURY};
use tokenomy_receipts::{verify_bundle, verify_consistency_notes, VerifierKey};

fn opts(dir: &std::path::Path, pg: Option<&str>) -> OpenOptions {
    // A log name of each data dir's own, as nodes of one ledger must have.
    let origin = format!("test.node/{}", dir.file_name().and_then(|n| n.to_str()).unwrap_or("log"));
    OpenOptions { data_dir: dir.to_path_buf(), database_url: pg.map(str::to_string), origin: Some(origin), env: vec![] }
}

use tokenomy_ledger::testing::{database_away, fresh_database as fresh_pg, stores};

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

/// A ledger after its first run (a fresh PostgreSQL database `db`, or SQLite), closed again.
struct SetUp {
    dir: tempfile::TempDir,
    pg: Option<String>,
    first: FirstRun,
    accounts: u64,
    treasury_micros: i64,
}

async fn set_up_ledger(pg: Option<String>, db: &str) -> SetUp {
    let dir = tempfile::tempdir().unwrap();
    let pg = ledger_url(pg, db).await;
    let (b, first) = Billing::open(opts(dir.path(), pg.as_deref())).await.unwrap();
    let first = first.expect("an empty data dir is a first run");
    assert!(!dir.path().join(FIRST_RUN_FILE).exists(), "removed once the key files are written");
    let accounts = b.check().await.unwrap().accounts;
    let treasury_micros = b.account(TREASURY).await.unwrap().balance_micros;
    SetUp { dir, pg, first, accounts, treasury_micros }
}

impl SetUp {
    /// The data dir of another node on this ledger: `new_dir` on PostgreSQL; on SQLite, whose
    /// ledger lives in the data dir, the same one with the `lost` key files removed.
    fn other_node<'a>(&'a self, new_dir: &'a std::path::Path, lost: &[&str]) -> &'a std::path::Path {
        if self.pg.is_some() {
            return new_dir;
        }
        for f in lost {
            std::fs::remove_file(self.dir.path().join(f)).unwrap();
        }
        self.dir.path()
    }

    async fn open(&self, dir: &std::path::Path) -> (std::sync::Arc<Billing>, Option<FirstRun>) {
        Billing::open(opts(dir, self.pg.as_deref())).await.unwrap()
    }

    /// The ledger checks out, with `new_accounts` more accounts, nothing more minted and the
    /// local user still holding exactly the grant.
    async fn assert_one_grant(&self, b: &Billing, new_accounts: u64) {
        let c = b.check().await.unwrap();
        assert!(c.ok, "{:?}", c.problems);
        assert_eq!(c.accounts, self.accounts + new_accounts);
        assert_eq!(b.account(TREASURY).await.unwrap().balance_micros, self.treasury_micros, "nothing more minted");
        assert_eq!(b.account(self.first.user_account).await.unwrap().balance_micros, self.first.grant_micros);
    }
}

/// The first run (admin key, local user, starting grant) happens once per ledger: a data dir
/// that comes to a ledger set up before gets an admin key of its own and mints nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_joining_a_set_up_ledger_gets_an_admin_key_and_mints_nothing() {
    for pg in stores() {
        let set_up = set_up_ledger(pg, "tokenomy_billing_join").await;
        let new_dir = tempfile::tempdir().unwrap();
        let dir = set_up.other_node(new_dir.path(), &["admin.key"]);
        let (b, again) = set_up.open(dir).await;
        assert!(again.is_none(), "no second first run");
        let key = std::fs::read_to_string(dir.join("admin.key")).unwrap();
        assert!(b.authenticate(Some(key.trim())).await.unwrap().is_admin());
        assert_eq!(dir.join("user.key").exists(), set_up.pg.is_none(), "a joining data dir gets no user.key");
        set_up.assert_one_grant(&b, 0).await;
        drop(b);
        // And it starts as any node does from then on.
        let (_, third) = set_up.open(dir).await;
        assert!(third.is_none());
    }
}

/// A first run cut short after it changed the ledger (its key files not written, its keys still
/// in `DATA_DIR/first-run`) resumes with the same keys: one local user, one grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_first_run_resumes_with_the_same_keys_and_one_grant() {
    for pg in stores() {
        let set_up = set_up_ledger(pg, "tokenomy_billing_resume").await;
        let (dir, first) = (set_up.dir.path(), &set_up.first);
        // As if the node had died after its ledger writes, before writing the key files.
        std::fs::remove_file(dir.join("admin.key")).unwrap();
        std::fs::remove_file(dir.join("user.key")).unwrap();
        std::fs::write(dir.join(FIRST_RUN_FILE), format!("admin {}\nuser {}\n", first.admin_key, first.user_key)).unwrap();

        let (b, again) = set_up.open(dir).await;
        let again = again.expect("the first run resumes");
        assert_eq!((&again.admin_key, &again.user_key, again.user_account), (&first.admin_key, &first.user_key, first.user_account));
        assert_eq!(std::fs::read_to_string(dir.join("user.key")).unwrap().trim(), first.user_key);
        assert_eq!(std::fs::read_to_string(dir.join("admin.key")).unwrap().trim(), first.admin_key);
        assert!(!dir.join(FIRST_RUN_FILE).exists());
        set_up.assert_one_grant(&b, 0).await;
    }
}

/// Two first runs on one ledger (nodes started on an empty PostgreSQL ledger at the same
/// moment): the one whose grant lands first sets the ledger up; the other finds the grant's
/// idempotency key taken, revokes the key of the local user it made and joins with an admin key
/// only. Raced here deterministically: the second first run starts from a `first-run` file of
/// fresh keys on a ledger set up meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_run_that_loses_the_race_joins_and_mints_nothing() {
    for pg in stores() {
        let set_up = set_up_ledger(pg, "tokenomy_billing_race").await;
        let new_dir = tempfile::tempdir().unwrap();
        let dir = set_up.other_node(new_dir.path(), &["admin.key", "user.key"]);
        let ((admin_key, _), (user_key, _)) = (keys::generate(), keys::generate());
        std::fs::write(dir.join(FIRST_RUN_FILE), format!("admin {admin_key}\nuser {user_key}\n")).unwrap();

        let (b, again) = set_up.open(dir).await;
        assert!(again.is_none(), "the race was lost: no first run");
        assert_eq!(std::fs::read_to_string(dir.join("admin.key")).unwrap().trim(), admin_key);
        assert!(b.authenticate(Some(&admin_key)).await.unwrap().is_admin());
        assert!(!dir.join("user.key").exists() && !dir.join(FIRST_RUN_FILE).exists());
        assert!(matches!(b.authenticate(Some(&user_key)).await, Err(BillingError::Unauthorized(_))), "its user key is revoked");
        set_up.assert_one_grant(&b, 0).await; // (the winner's local user has the name: the loser makes none)
    }
}

/// Nodes started at the same moment on one empty PostgreSQL ledger: one first run, one grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_starting_together_on_an_empty_ledger_mint_one_grant() {
    let Some(pg) = stores().into_iter().flatten().next() else { return };
    let pg = fresh_pg(&pg, "tokenomy_billing_together").await;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let open = |i: usize| Billing::open(opts(dirs[i].path(), Some(&pg)));
    let (a, b, c) = tokio::join!(open(0), open(1), open(2));
    let opened = [a.unwrap(), b.unwrap(), c.unwrap()];
    let firsts: Vec<_> = opened.iter().filter_map(|(_, f)| f.clone()).collect();
    assert_eq!(firsts.len(), 1, "exactly one first run");
    let b = &opened[0].0;
    assert!(b.check().await.unwrap().ok);
    assert_eq!(b.account(TREASURY).await.unwrap().balance_micros, -firsts[0].grant_micros, "one grant");
    for d in &dirs {
        assert!(d.path().join("admin.key").exists() && !d.path().join(FIRST_RUN_FILE).exists());
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

/// An `Idempotency-Key` is charged at most once, yet an attempt that failed (its hold voided,
/// nothing charged) does not stop a retry: the retry runs under the key's next attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_attempt_of_an_idempotency_key_lets_a_retry_run_and_a_charged_one_does_not() {
    for pg in stores() {
        let dir = tempfile::tempdir().unwrap();
        let pg = ledger_url(pg, "tokenomy_billing_attempts").await;
        let (b, first) = Billing::open(opts(dir.path(), pg.as_deref())).await.unwrap();
        let user = b.authenticate(Some(&first.unwrap().user_key)).await.unwrap();
        let keyed = |id: &str| ChargeRequest { idempotency_key: Some("order-7".into()), ..req(id, 100, 100) };
        let conflict = |e: BillingError, what: &str| match e {
            BillingError::Idempotency { message, .. } => assert!(message.contains(what), "{message}"),
            e => panic!("{e:?}"),
        };
        // Another key that looks like a later attempt of this one is a key of its own.
        let lookalike = ChargeRequest { idempotency_key: Some("order-7~2".into()), ..req("lookalike", 100, 100) };
        let h = b.hold(&user, &lookalike).await.unwrap();
        b.settle(h, served(100, 10)).await.unwrap().expect("charged");
        // Two attempts fail (the engine refused, the queue was full): each is voided.
        for i in 0..2 {
            let h = b.hold(&user, &keyed(&format!("fail-{i}"))).await.unwrap();
            b.void(h).await.unwrap();
        }
        // The third runs; while it does, a duplicate is refused as in progress.
        // (The duplicate comes within the same millisecond, most often: the ledger tells it
        // apart by the id each request drew for its hold.)
        let h = b.hold(&user, &keyed("ok")).await.unwrap();
        conflict(b.hold(&user, &keyed("dup")).await.unwrap_err(), "still in progress");
        b.settle(h, served(100, 10)).await.unwrap().expect("charged");
        // Charged: every later retry is refused, and nothing more is held.
        conflict(b.hold(&user, &keyed("again")).await.unwrap_err(), "charged once");
        let a = b.account(user.account).await.unwrap();
        assert_eq!(a.pending_micros, 0);
        let posted = b.store().statement(user.account, None, 100).await.unwrap().items;
        let charges = posted.iter().filter(|t| t.code == tokenomy_ledger::TransferCode::UsageCharge && !t.hold).count();
        assert_eq!(charges, 2, "order-7 and its lookalike, once each: {posted:?}");
        // A key that failed IDEMPOTENT_ATTEMPTS_MAX times is refused.
        let other = |id: &str| ChargeRequest { idempotency_key: Some("flaky".into()), ..req(id, 100, 100) };
        for i in 0..tokenomy_billing::IDEMPOTENT_ATTEMPTS_MAX {
            let h = b.hold(&user, &other(&format!("flaky-{i}"))).await.unwrap();
            b.void(h).await.unwrap();
        }
        conflict(b.hold(&user, &other("last")).await.unwrap_err(), "use a new one");
        assert!(b.store().check().await.unwrap().ok);
    }
}

/// Two nodes on one PostgreSQL ledger get the same request (one `Idempotency-Key`) at once,
/// as a client retrying against a load balancer would send it: one runs it, the other is told
/// it is in progress, round after round; then it is charged once. (The ledger's
/// `postgres_two_nodes_placing_one_key_at_once_tell_whose_hold_it_is` pins both holds to one
/// millisecond, which only the hold's id tells apart.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_given_one_idempotency_key_at_once_run_it_once() {
    let Some(pg) = stores().into_iter().flatten().next() else { return };
    let pg = fresh_pg(&pg, "tokenomy_billing_two_nodes_idem").await;
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let (one, first) = Billing::open(opts(dirs[0].path(), Some(&pg))).await.unwrap();
    let (two, _) = Billing::open(opts(dirs[1].path(), Some(&pg))).await.unwrap();
    let key = first.unwrap().user_key;
    let (u1, u2) = (one.authenticate(Some(&key)).await.unwrap(), two.authenticate(Some(&key)).await.unwrap());
    for round in 0..30 {
        let keyed = |id: &str| ChargeRequest { idempotency_key: Some(format!("job-{round}")), ..req(id, 100, 100) };
        let (k1, k2) = (keyed("node-1"), keyed("node-2"));
        let (r1, r2) = tokio::join!(one.hold(&u1, &k1), two.hold(&u2, &k2));
        let (ran, refused) = match (r1, r2) {
            (Ok(h), Err(e)) => ((&one, h), e),
            (Err(e), Ok(h)) => ((&two, h), e),
            (r1, r2) => panic!("round {round}: exactly one node runs it: {:?} / {:?}", r1.map(|_| ()), r2.map(|_| ())),
        };
        assert!(matches!(&refused, BillingError::Idempotency { code: "idempotency_key_in_use", message } if message.contains("still in progress")), "{refused:?}");
        ran.0.settle(ran.1, served(100, 10)).await.unwrap().expect("charged");
    }
    let posted = one.store().statement(u1.account, None, 1000).await.unwrap().items;
    let charges = posted.iter().filter(|t| t.code == tokenomy_ledger::TransferCode::UsageCharge && !t.hold).count();
    assert_eq!(charges, 30, "each key charged once");
    assert_eq!(one.account(u1.account).await.unwrap().pending_micros, 0);
    assert!(two.check().await.unwrap().ok);
}

/// Two nodes on one PostgreSQL ledger share its log, and each signs with its own key. Each
/// publishes its signatures and checkpoints to the ledger, so either node serves the other's
/// receipts, verifiable with the issuing node's key alone, even once that node is gone; a
/// receipt its node has not published is waited for, then the answer names that node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_node_of_a_ledger_serves_every_nodes_receipts() {
    let Some(pg) = stores().into_iter().flatten().next() else { return };
    let pg = fresh_pg(&pg, "tokenomy_billing_receipt_node").await;
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    // Each node the name it takes by default (its own), as nodes started without --origin do;
    // publishing every 200 ms (the upkeep's tick; these tests call `publish` themselves).
    let node = |d: &std::path::Path| {
        let env = vec![("TOKENOMY_BILLING__CHECKPOINT_INTERVAL_MS".to_string(), "200".to_string())];
        OpenOptions { origin: None, env, ..opts(d, Some(&pg)) }
    };
    let (one, first) = Billing::open(node(dirs[0].path())).await.unwrap();
    let (two, _) = Billing::open(node(dirs[1].path())).await.unwrap();
    let key = first.unwrap().user_key;
    let (u1, u2) = (one.authenticate(Some(&key)).await.unwrap(), two.authenticate(Some(&key)).await.unwrap());
    let pub_key = |d: &tempfile::TempDir| VerifierKey::parse(std::fs::read_to_string(d.path().join("node.pub")).unwrap().trim()).unwrap();
    let (key_one, key_two) = (pub_key(&dirs[0]), pub_key(&dirs[1]));
    let charge = |b: &std::sync::Arc<Billing>, u, id: &'static str| {
        let (b, u) = (b.clone(), u);
        async move {
            let h = b.hold(&u, &req(id, 100, 100)).await.unwrap();
            b.settle(h, served(100, 10)).await.unwrap().expect("charged").receipt_id
        }
    };
    let verifies = |bundle: &str, key: &VerifierKey, id: &str| assert_eq!(verify_bundle(bundle, key).unwrap().receipt.receipt_id, id);

    // Node one's receipt, asked of node two before one published it: two waits for it.
    let r1 = charge(&one, u1.clone(), "on-one").await;
    verifies(&one.receipt_bundle(&r1, &u1).await.unwrap(), &key_one, &r1);
    let publisher = {
        let one = one.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(150)).await;
            one.publish().await.unwrap()
        })
    };
    let from_two = two.receipt_bundle(&r1, &u2).await.unwrap();
    assert!(publisher.await.unwrap().unwrap() > 0, "published");
    verifies(&from_two, &key_one, &r1);
    assert!(verify_bundle(&from_two, &key_two).is_err(), "signed by the node that issued it, not the one serving it");

    // Node two's receipt, with node one publishing first (it signs only its own receipts).
    let r2 = charge(&two, u2.clone(), "on-two").await;
    one.publish().await.unwrap();
    two.publish().await.unwrap();
    verifies(&one.receipt_bundle(&r2, &u1).await.unwrap(), &key_two, &r2);
    // The ledger's keys, from either node, this node's first.
    let keys: Vec<String> = two.node_keys().await.unwrap().iter().map(|k| k.to_string()).collect();
    assert_eq!(keys.len(), 2);
    assert_eq!(keys[0], key_two.to_string());
    assert!(keys.contains(&key_one.to_string()));

    // A receipt whose node went away before publishing it: the answer names that node, after
    // waiting a few publishing intervals for it.
    let r3 = charge(&one, u1.clone(), "unpublished").await;
    drop(one);
    let started = std::time::Instant::now();
    match two.receipt_bundle(&r3, &u2).await {
        Err(BillingError::Misdirected(m)) => assert!(m.contains(key_one.name()) && m.contains("not published"), "{m}"),
        other => panic!("{:?}", other.map(|_| ())),
    }
    let waited_ms = started.elapsed().as_millis() as u64;
    assert!(waited_ms >= tokenomy_billing::publish_wait_ms(200), "waited {waited_ms} ms");
    // Node one, started again on its data dir, publishes what it had not (from where it left
    // off), and node two serves it; the receipts node one published before are still served
    // once it is gone for good.
    let (one, _) = Billing::open(node(dirs[0].path())).await.unwrap();
    one.publish().await.unwrap();
    drop(one);
    verifies(&two.receipt_bundle(&r3, &u2).await.unwrap(), &key_one, &r3);
    verifies(&two.receipt_bundle(&r1, &u2).await.unwrap(), &key_one, &r1);
    assert!(two.check().await.unwrap().ok);
}

/// A settlement whose database is away is tried again, not dropped (its hold would expire,
/// and the tokens served would go unpaid). Away for a second: the request's own attempts
/// post the charge. Away for longer: the request is answered without its receipt, and the
/// charge is posted in the background once the database is back. PostgreSQL only: a
/// database there can be taken away and brought back without touching the other tests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settlement_that_fails_while_the_database_is_away_is_retried_not_dropped() {
    let Ok(server) = std::env::var("TOKENOMY_TEST_POSTGRES_URL") else {
        return eprintln!("SKIP PostgreSQL: TOKENOMY_TEST_POSTGRES_URL is not set");
    };
    let db = "tokenomy_billing_away";
    let url = fresh_pg(&server, db).await;
    let dir = tempfile::tempdir().unwrap();
    let (b, first) = Billing::open(opts(dir.path(), Some(&url))).await.unwrap();
    let user = b.authenticate(Some(&first.unwrap().user_key)).await.unwrap();
    let before = b.account(user.account).await.unwrap().balance_micros;
    let second = std::time::Duration::from_millis(1_000);

    let h = b.hold(&user, &req("brief", 100, 100)).await.unwrap();
    let back = database_away(&server, db, second).await;
    let brief = b.settle(h, served(100, 10)).await.unwrap().expect("charged with a receipt");
    back.await.unwrap();

    let h = b.hold(&user, &req("long", 100, 100)).await.unwrap();
    let held = h.held_micros;
    let back = database_away(&server, db, 4 * second).await;
    let e = b.settle(h, served(100, 20)).await.unwrap_err();
    assert!(e.to_string().contains("being retried"), "{e}");
    back.await.unwrap();
    let mut acc = b.account(user.account).await.unwrap();
    for _ in 0..150 {
        if acc.pending_micros == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        acc = b.account(user.account).await.unwrap();
    }
    assert_eq!(acc.pending_micros, 0, "the second hold ({held} micros) was settled in the background");
    let posted = b.store().statement(user.account, None, 100).await.unwrap().items;
    let charges: Vec<i64> =
        posted.iter().filter(|t| t.code == tokenomy_ledger::TransferCode::UsageCharge && !t.hold).map(|t| t.amount_micros).collect();
    assert_eq!(charges.len(), 2, "each request charged once: {posted:?}");
    assert!(charges.contains(&brief.amount_micros));
    assert_eq!(acc.balance_micros, before - charges.iter().sum::<i64>());
    assert!(b.store().check().await.unwrap().ok);
}

/// A request's tokens reserved against its key's TPM come back when its hold goes away in
/// any way: settled (replaced by what it used), voided, or dropped unsettled (a request task
/// that failed); before, a dropped hold kept its reservation until the node restarted.
#[tokio::test]
async fn a_holds_tpm_reservation_is_released_however_the_hold_ends() {
    let dir = tempfile::tempdir().unwrap();
    let (b, first) = Billing::open(opts(dir.path(), None)).await.unwrap();
    let admin = b.authenticate(Some(&first.unwrap().admin_key)).await.unwrap();
    let acc = b.create_account("agent", tokenomy_ledger::AccountKind::User).await.unwrap();
    b.mint(acc.id, 10_000_000, "tpm-test-grant", &admin).await.unwrap();
    let (_, key) = b.create_key(acc.id, &["inference".into()], None, Some(1_000), Default::default()).await.unwrap();
    let p = b.authenticate(Some(&key)).await.unwrap();
    // Two requests of 910 tokens fill more than the minute's 1 000: a third waits.
    let limited = |r: Result<tokenomy_billing::Hold, BillingError>| matches!(r, Err(BillingError::RateLimited(_)));
    // A request that may use more than a minute's tokens is refused outright, reserving none.
    let e = b.hold(&p, &req("huge", 10, 991)).await.unwrap_err();
    assert!(matches!(e, BillingError::RequestTooLarge { tokens: 1_001, tpm: 1_000 }), "{e:?}");
    for end in ["drop", "void"] {
        let (a, c) = (b.hold(&p, &req("a", 10, 900)).await.unwrap(), b.hold(&p, &req("c", 10, 900)).await.unwrap());
        assert!(limited(b.hold(&p, &req("x", 10, 900)).await), "{end}: the window is full");
        match end {
            "drop" => drop((a, c)),
            _ => {
                b.void(a).await.unwrap();
                b.void(c).await.unwrap();
            }
        }
        let again = b.hold(&p, &req("y", 10, 900)).await;
        assert!(again.is_ok(), "{end}: the reservations came back: {again:?}");
        b.void(again.unwrap()).await.unwrap();
    }
}

/// A PostgreSQL ledger that hangs instead of refusing (here: a lock held on the accounts, as a
/// stuck primary or a partition would leave every query waiting) fails a request as
/// `Unavailable` (503) after `ledger_timeout_ms` instead of holding it forever, `/ready`'s probe
/// says so too, and once the ledger answers the node serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ledger_that_hangs_fails_requests_in_time_and_the_node_recovers() {
    let Ok(server) = std::env::var("TOKENOMY_TEST_POSTGRES_URL") else {
        return eprintln!("SKIP PostgreSQL: TOKENOMY_TEST_POSTGRES_URL is not set");
    };
    let url = fresh_pg(&server, "tokenomy_billing_hang").await;
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path(), Some(&url));
    o.env = vec![("TOKENOMY_BILLING__LEDGER_TIMEOUT_MS".into(), "1000".into())];
    let (b, first) = Billing::open(o).await.unwrap();
    let user = b.authenticate(Some(&first.unwrap().user_key)).await.unwrap();
    b.ledger_reachable().await.unwrap();

    let lock = tokenomy_ledger::testing::TableLock::take(&url, "accounts").await;
    let t0 = std::time::Instant::now();
    let e = b.hold(&user, &req("hung", 10, 10)).await.unwrap_err();
    assert!(matches!(e, BillingError::Unavailable(_)), "{e:?}");
    assert!(t0.elapsed() < std::time::Duration::from_secs(5), "failed after {:?}", t0.elapsed());
    assert!(matches!(b.ledger_reachable().await, Err(BillingError::Unavailable(_))));

    lock.release().await;
    b.ledger_reachable().await.unwrap();
    // The refused request's hold, placed once the ledger answered, is voided at once, not left
    // holding its credits for a hold timeout.
    // (A read may still time out while the server catches up on a loaded machine: it is
    // looked at again, as the node's own reads would be by the next request.)
    let holds = || async { b.store().statement(user.account, None, 100).await.map(|p| p.items.into_iter().filter(|t| t.hold).collect::<Vec<_>>()) };
    let mut late = holds().await;
    for _ in 0..100 {
        if matches!(&late, Ok(l) if l.len() == 1 && l[0].state == tokenomy_ledger::TransferState::Voided) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        late = holds().await;
    }
    let late = late.unwrap();
    assert!(late.len() == 1 && late[0].state == tokenomy_ledger::TransferState::Voided, "the late hold was placed, then voided: {late:?}");
    assert_eq!(b.account(user.account).await.unwrap().pending_micros, 0);
    let h = b.hold(&user, &req("after", 10, 10)).await.unwrap();
    b.settle(h, served(10, 5)).await.unwrap().expect("charged");
}

/// A ledger whose receipts log goes back under a running node (a restored backup, a failover
/// that lost commits) and grows again with other entries is noticed at the node's next look at
/// the log: it stops charging (every request, mint and checkpoint refused, `/ready`'s probe
/// failing) instead of signing checkpoints over charges the ledger no longer has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_that_goes_back_under_a_running_node_halts_its_charging() {
    let Ok(server) = std::env::var("TOKENOMY_TEST_POSTGRES_URL") else {
        return eprintln!("SKIP PostgreSQL: TOKENOMY_TEST_POSTGRES_URL is not set");
    };
    let url = fresh_pg(&server, "tokenomy_billing_rewind").await;
    let dir = tempfile::tempdir().unwrap();
    let (b, first) = Billing::open(opts(dir.path(), Some(&url))).await.unwrap();
    let user = b.authenticate(Some(&first.unwrap().user_key)).await.unwrap();
    let charge = |id: &'static str| {
        let (b, user) = (b.clone(), user.clone());
        async move {
            let h = b.hold(&user, &req(id, 10, 10)).await?;
            b.settle(h, served(10, 5)).await
        }
    };
    for id in ["a", "b", "c"] {
        charge(id).await.unwrap();
    }
    // (Published, as a node's upkeep does: what it published of the lost entries goes too.)
    let size = b.publish().await.unwrap().expect("all published");
    tokenomy_ledger::testing::rewind_log(&url, size - 2).await;
    // Two other charges take the places of the two lost ones: the log is as long as before.
    charge("d").await.unwrap();
    charge("e").await.unwrap();
    let e = b.checkpoint().await.unwrap_err();
    assert!(matches!(&e, BillingError::LogRewritten(why) if why.contains(&format!("entry {}", size - 1))), "{e:?}");
    assert!(matches!(charge("f").await, Err(BillingError::LogRewritten(_))));
    assert!(matches!(b.ledger_reachable().await, Err(BillingError::LogRewritten(_))));
    let admin = b.authenticate(Some(&std::fs::read_to_string(dir.path().join("admin.key")).unwrap().trim().to_string())).await.unwrap();
    assert!(matches!(b.mint(user.account, 1, "after-rewind", &admin).await, Err(BillingError::LogRewritten(_))));
}

/// A settlement still being retried when the node stops (a restart during a ledger outage) is
/// not lost: it waits in `DATA_DIR/unsettled/` and the next start on that data dir posts it,
/// once (before, the node exited and the hold expired: the tokens served went unpaid).
#[test]
fn a_settlement_retrying_when_the_node_stops_is_posted_by_its_next_start() {
    posted_after_a_stop(false);
}

/// The same when the hold was voided while the node was down (it expired, and another node
/// of the ledger swept it): the account is charged directly, with the same receipt.
#[test]
fn a_settlement_whose_hold_was_voided_meanwhile_is_charged_directly() {
    posted_after_a_stop(true);
}

/// A node whose store stalled longer than a hold's timeout (so its upkeep could not keep the
/// hold alive) finds, when the store answers again, that another node voided the hold as
/// expired: the request is still charged, directly, with the receipt its client was promised
/// (it used to be answered without a receipt and never charged).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_voided_under_a_running_request_is_charged_directly() {
    for pg in stores() {
        let dir = tempfile::tempdir().unwrap();
        let url = ledger_url(pg, "tokenomy_billing_voided_under").await;
        let (b, first) = Billing::open(opts(dir.path(), url.as_deref())).await.unwrap();
        let user = b.authenticate(Some(&first.unwrap().user_key)).await.unwrap();
        let before = b.account(user.account).await.unwrap().balance_micros;
        let h = b.hold(&user, &req("voided-under", 100, 100)).await.unwrap();
        let held = b.store().statement(user.account, None, 100).await.unwrap().items.into_iter().find(|t| t.hold).unwrap();
        b.store().void(held.id).await.unwrap(); // as another node's sweep of expired holds does
        let r = b.settle(h, served(100, 20)).await.unwrap().expect("charged");
        assert_eq!(r.receipt_id, "rcpt_voided-under");
        let again = b.store().statement(user.account, None, 100).await.unwrap().items;
        let charge = again.iter().find(|t| t.idempotency_key == format!("late:{}", held.id)).expect("a late charge");
        assert_eq!((charge.amount_micros, charge.state), (r.amount_micros, tokenomy_ledger::TransferState::Posted));
        assert_eq!(b.account(user.account).await.unwrap().balance_micros, before - r.amount_micros);
        let bundle = b.receipt_bundle("rcpt_voided-under", &user).await.unwrap();
        let key = VerifierKey::parse(std::fs::read_to_string(dir.path().join("node.pub")).unwrap().trim()).unwrap();
        assert_eq!(verify_bundle(&bundle, &key).unwrap().receipt.amount_micros, -r.amount_micros);
        assert!(b.store().check().await.unwrap().ok);

        // The same, when the account spent the credits the voided hold no longer kept: the
        // answer names its receipt as pending, and the charge lands once credits come in.
        let h = b.hold(&user, &req("voided-spent", 100, 100)).await.unwrap();
        let held = b.store().statement(user.account, None, 100).await.unwrap().items.into_iter().rfind(|t| t.hold).unwrap();
        b.store().void(held.id).await.unwrap();
        let other = b.create_account("elsewhere", tokenomy_ledger::AccountKind::User).await.unwrap();
        let all = b.account(user.account).await.unwrap().available_micros();
        b.store().transfer(user.account, other.id, all, "spent-it", None).await.unwrap();
        let e = b.settle(h, served(100, 20)).await.unwrap_err();
        assert!(matches!(&e, BillingError::SettlementDeferred { receipt_id, .. } if receipt_id == "rcpt_voided-spent"), "{e}");
        b.store().mint(user.account, 1_000, "top-up", None).await.unwrap();
        let late = format!("late:{}", held.id);
        let mut landed = None;
        for _ in 0..100 {
            let items = b.store().statement(user.account, None, 100).await.unwrap().items;
            landed = items.into_iter().find(|t| t.idempotency_key == late);
            if landed.is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let landed = landed.expect("charged once credits came in");
        assert_eq!(b.account(user.account).await.unwrap().balance_micros, 1_000 - landed.amount_micros);
        assert!(b.receipt_bundle("rcpt_voided-spent", &user).await.is_ok());
        assert!(b.store().check().await.unwrap().ok);
    }
}

fn posted_after_a_stop(voided_meanwhile: bool) {
    let Ok(server) = std::env::var("TOKENOMY_TEST_POSTGRES_URL") else {
        return eprintln!("SKIP PostgreSQL: TOKENOMY_TEST_POSTGRES_URL is not set");
    };
    let runtime = || tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let db = if voided_meanwhile { "tokenomy_billing_unsettled_voided" } else { "tokenomy_billing_unsettled" };
    let dir = tempfile::tempdir().unwrap();
    let first_run = runtime();
    let (url, account, before) = first_run.block_on(async {
        let url = fresh_pg(&server, db).await;
        let (b, first) = Billing::open(opts(dir.path(), Some(&url))).await.unwrap();
        let user = b.authenticate(Some(&first.unwrap().user_key)).await.unwrap();
        let before = b.account(user.account).await.unwrap().balance_micros;
        let h = b.hold(&user, &req("stopped", 100, 100)).await.unwrap();
        let _back = database_away(&server, db, std::time::Duration::from_secs(600)).await;
        let e = b.settle(h, served(100, 20)).await.unwrap_err();
        assert!(matches!(&e, BillingError::SettlementDeferred { receipt_id, .. } if receipt_id == "rcpt_stopped"), "{e}");
        (url, user.account, before)
    });
    // The process stops: its tasks (the retry, and the one that would bring the database back) end.
    first_run.shutdown_background();
    let journal = dir.path().join(tokenomy_billing::UNSETTLED_DIR);
    let files: Vec<_> = std::fs::read_dir(&journal).unwrap().map(|f| f.unwrap().path()).collect();
    assert_eq!(files.len(), 1, "the settlement waits on disk");

    runtime().block_on(async {
        tokenomy_ledger::testing::database_back(&server, db).await;
        if voided_meanwhile {
            let hold = u128::from_str_radix(files[0].file_stem().unwrap().to_str().unwrap(), 16).unwrap();
            let other_node = tokenomy_ledger::PgStore::open(&url, 1).await.unwrap();
            other_node.void(tokenomy_ledger::TransferId(hold)).await.unwrap();
        }
        // Opening the data dir posts it, before any hold could be expired.
        let (b, _) = Billing::open(opts(dir.path(), Some(&url))).await.unwrap();
        let acc = b.account(account).await.unwrap();
        assert_eq!(acc.pending_micros, 0, "the hold was settled or voided");
        assert_eq!(std::fs::read_dir(&journal).unwrap().count(), 0, "and its journal file removed");
        let posted = b.store().statement(account, None, 100).await.unwrap().items;
        let code = if voided_meanwhile { tokenomy_ledger::TransferCode::Transfer } else { tokenomy_ledger::TransferCode::UsageCharge };
        let charges: Vec<&tokenomy_ledger::Transfer> = posted.iter().filter(|t| t.code == code && !t.hold).collect();
        assert_eq!(charges.len(), 1, "charged once: {posted:?}");
        assert_eq!(acc.balance_micros, before - charges[0].amount_micros);
        // The receipt the client was given exists, for the charge posted.
        let user_key = std::fs::read_to_string(dir.path().join("user.key")).unwrap();
        let user = b.authenticate(Some(user_key.trim())).await.unwrap();
        let bundle = b.receipt_bundle("rcpt_stopped", &user).await.unwrap();
        let key = VerifierKey::parse(std::fs::read_to_string(dir.path().join("node.pub")).unwrap().trim()).unwrap();
        let v = verify_bundle(&bundle, &key).unwrap();
        assert_eq!((v.receipt.amount_micros, v.receipt.transfer_id.as_str()), (-charges[0].amount_micros, charges[0].id.to_string().as_str()));
        assert!(b.store().check().await.unwrap().ok);
    });
}

/// On SQLite a node is its ledger's only user, so a hold still pending when it starts is an
/// earlier run's, whose request died with it (a crash): it is voided at start, freeing the
/// credits it held, and a retry of that request's Idempotency-Key runs at once instead of
/// being told for a hold timeout (15 min) that the request is still in progress.
#[tokio::test]
async fn an_embedded_node_voids_the_holds_of_its_earlier_run_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let (b, first) = Billing::open(opts(dir.path(), None)).await.unwrap();
    let user_key = first.unwrap().user_key;
    let user = b.authenticate(Some(&user_key)).await.unwrap();
    let keyed = ChargeRequest { idempotency_key: Some("crashed".into()), ..req("c1", 100, 1_000) };
    let h = b.hold(&user, &keyed).await.unwrap();
    assert!(b.account(user.account).await.unwrap().pending_micros > 0);
    assert!(matches!(b.hold(&user, &ChargeRequest { request_id: "c2".into(), ..keyed.clone() }).await, Err(BillingError::Idempotency { code: "idempotency_key_in_use", .. })));
    // The process dies with the request: nothing settles or voids the hold.
    std::mem::forget(h);
    drop(b);

    let (b, _) = Billing::open(opts(dir.path(), None)).await.unwrap();
    let user = b.authenticate(Some(&user_key)).await.unwrap();
    assert_eq!(b.account(user.account).await.unwrap().pending_micros, 0, "the orphaned hold was voided at start");
    let retry = b.hold(&user, &ChargeRequest { request_id: "c3".into(), ..keyed }).await.expect("the retry runs");
    b.settle(retry, served(100, 10)).await.unwrap().expect("charged once");
}

/// On PostgreSQL a restarted node voids the holds its earlier run placed for requests without
/// an `Idempotency-Key` (they died with it), and leaves another node's request in progress
/// alone. (They used to lock the credits they held for the hold timeout, 15 minutes.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_voids_its_own_holds_of_before_and_no_one_elses() {
    let Some(server) = stores().into_iter().flatten().next() else { return };
    let pg = fresh_pg(&server, "tokenomy_billing_restart_holds").await;
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, first) = Billing::open(opts(dir_a.path(), Some(&pg))).await.unwrap();
    let user_key = first.unwrap().user_key;
    let (b, _) = Billing::open(opts(dir_b.path(), Some(&pg))).await.unwrap();
    let (ua, ub) = (a.authenticate(Some(&user_key)).await.unwrap(), b.authenticate(Some(&user_key)).await.unwrap());
    let crashed = a.hold(&ua, &req("died-with-a", 100, 1_000)).await.unwrap();
    let running = b.hold(&ub, &req("running-on-b", 100, 1_000)).await.unwrap();
    let pending = |b: std::sync::Arc<Billing>| async move { b.account(ua.account).await.unwrap().pending_micros };
    let both = pending(b.clone()).await;
    std::mem::forget(crashed); // node a dies with its request
    drop(a);

    let (a, _) = Billing::open(opts(dir_a.path(), Some(&pg))).await.unwrap();
    let left = pending(a.clone()).await;
    assert!(left > 0 && left < both, "a's hold voided, b's kept: {left} of {both}");
    b.settle(running, served(100, 10)).await.unwrap().expect("b's request is charged");
    assert_eq!(pending(a.clone()).await, 0);
    assert!(a.check().await.unwrap().ok);
}

/// A data dir the node creates is its owner's only (its ledger holds balances and key hashes).
#[cfg(unix)]
#[tokio::test]
async fn a_new_data_dir_is_readable_by_its_owner_only() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("node").join("data");
    Billing::open(opts(&dir, None)).await.unwrap();
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&dir).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o700);
}

/// A key's RPM and TPM hold for the key, not per node: on PostgreSQL two nodes of one ledger
/// step the same clocks under the key's row lock; on SQLite (one node per ledger) the node's
/// own clocks do the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_hold_across_the_nodes_of_one_ledger() {
    for pg in stores() {
        let s = set_up_ledger(pg, "tokenomy_billing_rates").await;
        let (a, _) = s.open(s.dir.path()).await;
        let other = tempfile::tempdir().unwrap();
        let b = match s.pg {
            Some(_) => s.open(other.path()).await.0,
            None => a.clone(), // SQLite: the ledger's only node
        };
        let acc = s.first.user_account;

        // RPM 4: sixteen requests at once, half on each node; exactly four get in.
        let (_, rpm_key) = a.create_key(acc, &["inference".into()], Some(4), None, Default::default()).await.unwrap();
        let (pa, pb) = (a.authenticate(Some(&rpm_key)).await.unwrap(), b.authenticate(Some(&rpm_key)).await.unwrap());
        let admitted = futures::future::join_all((0..16).map(|i| if i % 2 == 0 { a.admit(&pa) } else { b.admit(&pb) })).await;
        assert_eq!(admitted.iter().filter(|r| r.is_ok()).count(), 4, "{admitted:?}");
        for r in admitted.iter().filter_map(|r| r.as_ref().err()) {
            assert!(
                matches!(r, BillingError::RateLimited(l) if l.limit == "requests" && (1..=15_000).contains(&l.retry_after_ms)),
                "{r:?}"
            );
        }

        // TPM 100 (600 ms a token): a hold on one node reserves its prompt and max_tokens for
        // the other too. (A key with only a TPM is admitted on a fresh read of its clocks, whose
        // figures the admission returns; a response's headers show the clocks as its node's
        // last step on the key left them.)
        let (_, tpm_key) = a.create_key(acc, &["inference".into()], None, Some(100), Default::default()).await.unwrap();
        let (pa, pb) = (a.authenticate(Some(&tpm_key)).await.unwrap(), b.authenticate(Some(&tpm_key)).await.unwrap());
        let first = a.hold(&pa, &req("rate-1", 10, 50)).await.unwrap(); // 60 tokens: 36 s ahead
        let left = b.admit(&pb).await.unwrap().remaining_tokens;
        assert!((40..=41).contains(&left), "{left}");
        let second = b.hold(&pb, &req("rate-2", 10, 50)).await.unwrap(); // 72 s ahead: in debt
        let left = b.allowance_now(&pb, Default::default()).await.remaining_tokens;
        assert_eq!(left, 0, "the headers after a hold count it");
        let e = a.hold(&pa, &req("rate-3", 10, 10)).await.unwrap_err();
        assert!(matches!(&e, BillingError::RateLimited(l) if l.limit == "tokens" && (11_000..=12_001).contains(&l.retry_after_ms)), "{e:?}");
        // The first used 15 of its 60: its unused tail (27 s) comes back to both nodes.
        a.settle(first, served(10, 5)).await.unwrap();
        let left = a.allowance_now(&pa, Default::default()).await.remaining_tokens;
        assert!((25..=26).contains(&left), "{left}");
        let left = b.admit(&pb).await.unwrap().remaining_tokens;
        assert!((25..=26).contains(&left), "{left}");
        // A request that fails gives back all it reserved; one dropped without a word (its
        // task failed) too, on its own, a moment later.
        b.void(second).await.unwrap();
        let left = a.admit(&pa).await.unwrap().remaining_tokens;
        assert!((85..=86).contains(&left), "{left}");
        drop(b.hold(&pb, &req("rate-4", 10, 50)).await.unwrap());
        let mut left = 0;
        for _ in 0..50 {
            left = a.admit(&pa).await.unwrap().remaining_tokens;
            if left >= 85 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!((85..=86).contains(&left), "{left}");
        assert!(a.check().await.unwrap().ok);
    }
}

/// A PostgreSQL ledger whose server stops taking writes (here its sessions turn read-only, as
/// on a demoted primary) makes the node unready, not only its holds fail; it is ready again
/// once the server takes writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_ledger_that_takes_no_writes_is_not_ready() {
    let Some(base) = stores().into_iter().flatten().next() else { return };
    let db = "tokenomy_billing_read_only";
    let s = set_up_ledger(Some(base.clone()), db).await;
    let (b, _) = s.open(s.dir.path()).await;
    let user = b.authenticate(Some(&s.first.user_key)).await.unwrap();
    b.ledger_reachable().await.unwrap();
    let (admin, conn) = tokio_postgres::connect(&base, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    // New sessions are read-only; the node's open ones are cut, so it reconnects into them.
    let set_read_only = |on: bool| {
        let admin = &admin;
        async move {
            admin.batch_execute(&format!("ALTER DATABASE {db} SET default_transaction_read_only = {on}")).await.unwrap();
            let cut = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND usename = current_user AND pid <> pg_backend_pid()";
            admin.execute(cut, &[&db]).await.unwrap();
        }
    };
    set_read_only(true).await;
    let mut why = String::new();
    for _ in 0..50 {
        match b.ledger_reachable().await {
            Err(e) if e.to_string().contains("read-only") => {
                why = e.to_string();
                break;
            }
            _ => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    }
    assert!(why.contains("takes no writes"), "{why:?}");
    let e = b.hold(&user, &req("read-only", 10, 10)).await.unwrap_err();
    assert!(matches!(e, BillingError::Unavailable(_)), "{e:?}");
    set_read_only(false).await;
    let mut ready = false;
    for _ in 0..50 {
        if b.ledger_reachable().await.is_ok() {
            ready = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(ready, "ready again once the server takes writes");
    let h = b.hold(&user, &req("writable", 10, 10)).await.unwrap();
    b.settle(h, served(10, 10)).await.unwrap().unwrap();
}

/// Two nodes of one PostgreSQL ledger started with one `--origin` (one deployment template
/// for every replica): the second is refused at start, naming the first one's key; a node
/// restarted on its data dir keeps its name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_node_with_the_same_origin_is_refused_at_start() {
    let Some(base) = stores().into_iter().flatten().next() else { return };
    let s = set_up_ledger(Some(base), "tokenomy_billing_origins").await;
    let same = |d: &std::path::Path| OpenOptions { origin: Some("shared.example/log".into()), ..opts(d, s.pg.as_deref()) };
    let (first_dir, second_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, _) = Billing::open(same(first_dir.path())).await.unwrap();
    let key = std::fs::read_to_string(first_dir.path().join("node.pub")).unwrap();
    let e = Billing::open(same(second_dir.path())).await.unwrap_err().to_string();
    assert!(e.contains("shared.example/log") && e.contains(key.trim()) && e.contains("--origin"), "{e}");
    // The refused data dir keeps no key under the taken name: started again with a name of
    // its own, as the message says, it serves.
    assert!(!second_dir.path().join("node.key").exists(), "no key left behind");
    let own = OpenOptions { origin: Some("second.example/log".into()), ..opts(second_dir.path(), s.pg.as_deref()) };
    let (second, _) = Billing::open(own).await.unwrap();
    assert_eq!(second.origin(), "second.example/log");
    drop((a, second));
    let (again, _) = Billing::open(same(first_dir.path())).await.unwrap();
    assert_eq!(again.origin(), "shared.example/log");
}

/// Usage reports come from the ledger's receipts log: a restarted node still has them, a node
/// sharing the ledger (PostgreSQL) reports the other's charges too, a refund counts on its
/// day, and mints and transfers are not usage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_reports_are_the_ledgers_and_survive_a_restart() {
    for pg in stores() {
        let shared = pg.is_some();
        let pg = ledger_url(pg, "tokenomy_billing_usage").await;
        let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
        let (one, first) = Billing::open(opts(dirs[0].path(), pg.as_deref())).await.unwrap();
        let first = first.unwrap();
        let (user, admin) = (one.authenticate(Some(&first.user_key)).await.unwrap(), one.authenticate(Some(&first.admin_key)).await.unwrap());
        let today = u32::try_from(tokenomy_ledger::utc_day(tokenomy_ledger::now_ms())).unwrap();
        assert_eq!(one.usage_totals(Some(user.account)).await.unwrap().1, None, "the grant is no usage");

        let h = one.hold(&user, &req("u1", 1_000, 100)).await.unwrap();
        let r1 = one.settle(h, served(1_000, 10)).await.unwrap().unwrap();
        let h = one.hold(&user, &req("u2", 20, 100)).await.unwrap();
        let r2 = one.settle(h, served(20, 30)).await.unwrap().unwrap();
        one.refund(&r2.receipt_id, Some(1), &admin).await.unwrap();
        let other = one.create_account("payee", tokenomy_ledger::AccountKind::User).await.unwrap();
        one.transfer(user.account, other.id, 5, "usage-test-transfer", &admin).await.unwrap();
        drop(one); // a restart of the node, or (PostgreSQL) another node of the ledger

        let (two, _) = Billing::open(opts(dirs[usize::from(shared)].path(), pg.as_deref())).await.unwrap();
        let user2 = two.authenticate(Some(&first.user_key)).await.unwrap();
        let h = two.hold(&user2, &req("u3", 3, 100)).await.unwrap();
        let r3 = two.settle(h, served(3, 4)).await.unwrap().unwrap();
        let (t, since) = two.usage_totals(Some(user.account)).await.unwrap();
        assert_eq!(since, Some(today));
        assert_eq!((t.requests, t.prompt_tokens, t.completion_tokens), (3, 1_023, 44));
        assert_eq!((t.charged_micros, t.refunded_micros), ((r1.amount_micros + r2.amount_micros + r3.amount_micros) as u64, 1));
        let days = two.usage(Some(user.account), today - 1..=today).await.unwrap();
        let keys: Vec<_> = days.iter().map(|(k, _)| k.clone()).collect();
        let key_id = user.key_id.to_string();
        assert_eq!(keys, [(today, String::new(), String::new()), (today, "smollm2".to_string(), key_id)], "a refund is bucketed under no model or key");
        assert_eq!(two.usage(Some(other.id), 0..=today).await.unwrap(), [], "a transfer received is no usage");
        assert_eq!(two.usage_totals(None).await.unwrap().0.requests, 3, "the ledger's usage is every account's");
    }
}

/// The log view keeps hashes from 64-entry tiles up and reads a tile's entries back for a
/// proof that reaches inside it: receipts deep in a log of several tiles verify offline,
/// before and after a restart; consistency proofs between sizes inside complete tiles are
/// the full tree's; checkpoints signed as tiles complete extend the last one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_deep_in_a_log_of_several_tiles_verify() {
    for pg in stores() {
        let dir = tempfile::tempdir().unwrap();
        let url = ledger_url(pg, "tokenomy_billing_tiles").await;
        let (b, first) = Billing::open(opts(dir.path(), url.as_deref())).await.unwrap();
        let first = first.unwrap();
        let user = b.authenticate(Some(&first.user_key)).await.unwrap();
        let mut receipts = vec![];
        let mut notes = vec![];
        for i in 0..150 {
            let h = b.hold(&user, &req(&format!("t{i}"), 10, 10)).await.unwrap();
            receipts.push(b.settle(h, served(10, 5)).await.unwrap().expect("charged").receipt_id);
            if i % 50 == 20 {
                notes.push(b.checkpoint().await.unwrap().note);
            }
        }
        notes.push(b.checkpoint().await.unwrap().note);
        let key = VerifierKey::parse(std::fs::read_to_string(dir.path().join("node.pub")).unwrap().trim()).unwrap();
        let verify_all = |b: std::sync::Arc<Billing>| {
            let (receipts, user, key) = (receipts.clone(), user.clone(), key.clone());
            async move {
                let mut tiles = std::collections::BTreeSet::new();
                for id in receipts.iter().step_by(7).chain(receipts.last()) {
                    let v = verify_bundle(&b.receipt_bundle(id, &user).await.unwrap(), &key).unwrap();
                    assert_eq!(&v.receipt.receipt_id, id);
                    tiles.insert(v.receipt.log_index / 64);
                }
                assert!(tiles.len() >= 3, "receipts in three tiles: {tiles:?}");
            }
        };
        verify_all(b.clone()).await;
        // Consistency proofs: the node's against a full tree of the store's entries.
        let entries = b.store().log_entries(0, 1000).await.unwrap();
        let mut full = tokenomy_receipts::Tree::new();
        for e in &entries {
            full.push_data(&e.leaf_bytes);
        }
        let size = full.size();
        assert!(size > 150, "{size}");
        for (old, new) in [(1, size), (63, 64), (64, 130), (70, 129), (100, size), (size - 1, size)] {
            assert_eq!(b.consistency(old, new).await.unwrap(), full.consistency_proof(old, new).unwrap(), "{old} -> {new}");
        }
        for pair in notes.windows(2) {
            let old_size = tokenomy_receipts::Checkpoint::open(&pair[0], &key).unwrap().size;
            let new_size = tokenomy_receipts::Checkpoint::open(&pair[1], &key).unwrap().size;
            let proof = b.consistency(old_size, new_size).await.unwrap();
            verify_consistency_notes(&pair[0], &pair[1], &proof, &key).unwrap();
        }
        // A restart rebuilds the view (and checks it against the checkpoint it signed last).
        drop(b);
        let b = loop {
            match Billing::open(opts(dir.path(), url.as_deref())).await {
                Ok((b, _)) => break b,
                Err(e) if e.to_string().contains("lock") => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
                Err(e) => panic!("{e}"),
            }
        };
        verify_all(b).await;
    }
}

/// An entry changed inside a complete tile of the ledger's log (the node no longer holds
/// its hash, only its tile's) is caught when a proof reads that tile back: the node stops
/// charging rather than prove a receipt against a log it never signed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_changed_inside_a_complete_tile_halts_the_node() {
    let Ok(server) = std::env::var("TOKENOMY_TEST_POSTGRES_URL") else {
        return eprintln!("SKIP PostgreSQL: TOKENOMY_TEST_POSTGRES_URL is not set");
    };
    let url = fresh_pg(&server, "tokenomy_billing_tile_changed").await;
    let dir = tempfile::tempdir().unwrap();
    let (b, first) = Billing::open(opts(dir.path(), Some(&url))).await.unwrap();
    let user = b.authenticate(Some(&first.unwrap().user_key)).await.unwrap();
    let mut receipts = vec![];
    for i in 0..70 {
        let h = b.hold(&user, &req(&format!("c{i}"), 10, 10)).await.unwrap();
        receipts.push(b.settle(h, served(10, 5)).await.unwrap().expect("charged").receipt_id);
    }
    // The view reads the log (and signs it) before the change, and reads back no tile yet.
    assert!(b.checkpoint().await.unwrap().checkpoint.size > 64);
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client
        .batch_execute(
            "BEGIN; ALTER TABLE log_entries DISABLE TRIGGER log_entries_no_change; \
             UPDATE log_entries SET leaf_bytes = (SELECT leaf_bytes FROM log_entries WHERE log_index = 6) WHERE log_index = 5; \
             ALTER TABLE log_entries ENABLE TRIGGER log_entries_no_change; COMMIT",
        )
        .await
        .unwrap();
    let e = b.receipt_bundle(&receipts[20], &user).await.unwrap_err();
    assert!(matches!(&e, BillingError::LogRewritten(why) if why.contains("entries 0..=63")), "{e:?}");
    assert!(matches!(b.consistency(3, 66).await, Err(BillingError::LogRewritten(_))), "halted");
    let h = b.hold(&user, &req("after", 10, 10)).await;
    assert!(matches!(h, Err(BillingError::LogRewritten(_))), "{h:?}");
}

/// An entry changed in the tile still filling (held in memory, not read back) is caught when
/// its receipt is fetched: the node does not sign bytes it never logged, and stops charging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_changed_in_the_last_tile_is_not_signed() {
    let Ok(server) = std::env::var("TOKENOMY_TEST_POSTGRES_URL") else {
        return eprintln!("SKIP PostgreSQL: TOKENOMY_TEST_POSTGRES_URL is not set");
    };
    let url = fresh_pg(&server, "tokenomy_billing_tail_changed").await;
    let dir = tempfile::tempdir().unwrap();
    let (b, first) = Billing::open(opts(dir.path(), Some(&url))).await.unwrap();
    let user = b.authenticate(Some(&first.unwrap().user_key)).await.unwrap();
    let mut receipts = vec![];
    for i in 0..4 {
        let h = b.hold(&user, &req(&format!("l{i}"), 10, 10)).await.unwrap();
        receipts.push(b.settle(h, served(10, 5 + i)).await.unwrap().expect("charged").receipt_id);
    }
    let size = b.checkpoint().await.unwrap().checkpoint.size;
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    // The last receipt's entry gets the bytes of the one before it with only its amount changed.
    let last = i64::try_from(size - 1).unwrap();
    let row = client.query_one("SELECT leaf_bytes FROM log_entries WHERE log_index = $1", &[&last]).await.unwrap();
    let bytes: Vec<u8> = row.get(0);
    let text = String::from_utf8(bytes).unwrap();
    let forged = text.replacen("amount_micros -", "amount_micros -1", 1);
    assert_ne!(forged, text, "{text}");
    client
        .execute("ALTER TABLE log_entries DISABLE TRIGGER log_entries_no_change", &[])
        .await
        .unwrap();
    client.execute("UPDATE log_entries SET leaf_bytes = $1 WHERE log_index = $2", &[&forged.as_bytes(), &last]).await.unwrap();
    client.execute("ALTER TABLE log_entries ENABLE TRIGGER log_entries_no_change", &[]).await.unwrap();
    let e = b.receipt_bundle(receipts.last().unwrap(), &user).await.unwrap_err();
    assert!(matches!(&e, BillingError::LogRewritten(why) if why.contains(&format!("entry {last}"))), "{e:?}");
}
