//! The conformance suite: written once, generic over `LedgerStore`, run
//! against every store by `conformance_suite!` in main.rs.

use std::sync::Arc;

use tokenomy_ledger::*;

const C: i64 = MICROS_PER_CREDIT;
const T0: i64 = 1_700_000_000_000;

async fn assert_check_ok<S: LedgerStore>(s: &S) -> CheckReport {
    let report = s.check().await.unwrap();
    assert!(report.ok, "check failed: {:?}", report.problems);
    assert_eq!(report.sum_micros, 0);
    report
}

async fn funded<S: LedgerStore>(s: &S, name: &str, micros: i64) -> Account {
    let a = s.create_account(name, AccountKind::User).await.unwrap();
    if micros > 0 {
        s.mint(a.id, micros, &format!("fund-{}", a.id), None).await.unwrap();
    }
    s.get_account(a.id).await.unwrap()
}

fn leaf_fn() -> Leaf {
    Arc::new(|index: u64, t: &Transfer| {
        let mut v = index.to_be_bytes().to_vec();
        v.extend_from_slice(&t.id.to_bytes());
        v.extend_from_slice(&t.amount_micros.to_be_bytes());
        v
    })
}

pub async fn system_accounts_exist<S: LedgerStore>(s: Arc<S>) {
    assert_eq!(s.get_account(TREASURY).await.unwrap().kind, AccountKind::Treasury);
    assert_eq!(s.get_account(OPERATOR_REVENUE).await.unwrap().kind, AccountKind::OperatorRevenue);
    let r = assert_check_ok(&*s).await;
    assert_eq!((r.accounts, r.transfers), (2, 0));
    assert_eq!(s.log_size().await.unwrap(), 0);
}

pub async fn create_and_get_account<S: LedgerStore>(s: Arc<S>) {
    let a = s.create_account("alice", AccountKind::User).await.unwrap();
    let b = s.create_account("bot", AccountKind::Agent).await.unwrap();
    assert_ne!(a.id, b.id);
    assert_eq!(s.get_account(a.id).await.unwrap(), a);
    assert_eq!((a.balance_micros, a.pending_micros), (0, 0));
    for kind in [AccountKind::Treasury, AccountKind::OperatorRevenue] {
        assert!(matches!(s.create_account("x", kind).await, Err(LedgerError::InvalidArgument(_))));
    }
    assert!(matches!(s.create_account("", AccountKind::User).await, Err(LedgerError::InvalidArgument(_))));
    assert!(s.create_account(&"n".repeat(129), AccountKind::User).await.is_err());
    // A name is a handle: printable, not an id's shape, not a system account's, and unique.
    assert_eq!(s.create_account("alice", AccountKind::Agent).await.unwrap_err(), LedgerError::NameTaken("alice".into()));
    for bad in ["   ", "evil\nbalance_micros: 9", " alice", "0123456789abcdef0123456789ABCDEF", "Treasury", "operator_revenue", "operator-revenue", "Operator-Revenue"] {
        let e = s.create_account(bad, AccountKind::User).await.unwrap_err();
        assert!(matches!(&e, LedgerError::InvalidArgument(m) if m.contains(&format!("{bad:?}"))), "{bad:?}: {e:?}");
    }
    let named = s.list_accounts(None, 100).await.unwrap().into_iter().filter(|x| x.name == "alice").count();
    assert_eq!(named, 1);
    let missing = AccountId(u128::MAX);
    assert_eq!(s.get_account(missing).await, Err(LedgerError::UnknownAccount(missing)));
}

/// Accounts are listed in id order (creation order, to the millisecond), paged by the last id
/// seen, system accounts first.
pub async fn accounts_are_listed_in_pages<S: LedgerStore>(s: Arc<S>) {
    let made: Vec<AccountId> = {
        let mut v = Vec::new();
        for i in 0..5 {
            v.push(s.create_account(&format!("acct-{i}"), AccountKind::Agent).await.unwrap().id);
        }
        v.sort(); // ids order by creation time to the millisecond, then at random
        v
    };
    let first = s.list_accounts(None, 3).await.unwrap();
    assert_eq!(first.iter().map(|a| a.id).collect::<Vec<_>>(), vec![TREASURY, OPERATOR_REVENUE, made[0]]);
    let rest = s.list_accounts(Some(made[0]), 10).await.unwrap();
    assert_eq!(rest.iter().map(|a| a.id).collect::<Vec<_>>(), made[1..].to_vec());
    assert!(rest[0].name.starts_with("acct-") && rest[0].kind == AccountKind::Agent);
    assert!(s.list_accounts(Some(made[4]), 10).await.unwrap().is_empty());
    assert!(matches!(s.list_accounts(None, 0).await, Err(LedgerError::InvalidArgument(_))));
    assert!(matches!(s.list_accounts(None, MAX_PAGE_LEN + 1).await, Err(LedgerError::InvalidArgument(_))));
}

pub async fn mint_and_transfer<S: LedgerStore>(s: Arc<S>) {
    let a = funded(&*s, "a", 10 * C).await;
    let b = funded(&*s, "b", 0).await;
    assert_eq!(a.balance_micros, 10 * C);
    let t = s.transfer(a.id, b.id, 3 * C, "t1", None).await.unwrap();
    assert_eq!((t.state, t.code, t.amount_micros, t.hold), (TransferState::Posted, TransferCode::Transfer, 3 * C, false));
    assert_eq!(s.get_account(a.id).await.unwrap().balance_micros, 7 * C);
    assert_eq!(s.get_account(b.id).await.unwrap().balance_micros, 3 * C);
    assert_eq!(s.get_account(TREASURY).await.unwrap().balance_micros, -10 * C);
    let err = s.transfer(b.id, a.id, 3 * C + 1, "t2", None).await;
    assert_eq!(err, Err(LedgerError::InsufficientFunds { shortfall_micros: 1 }));
    s.transfer(b.id, OPERATOR_REVENUE, C, "t3", None).await.unwrap();
    assert_eq!(s.get_account(OPERATOR_REVENUE).await.unwrap().balance_micros, C);
    let r = assert_check_ok(&*s).await;
    assert_eq!(r.transfers, 3);
}

/// A refund gives a charge back from operator revenue: posted, idempotent per key, and only
/// from revenue to a customer (never new money from the treasury, never between customers).
pub async fn refunds_reverse_revenue<S: LedgerStore>(s: Arc<S>) {
    let a = funded(&*s, "a", 10 * C).await;
    let h = s.hold(a.id, 4 * C, "h", 60_000, T0).await.unwrap();
    s.settle(h.id, 3 * C, T0 + 1, None).await.unwrap();
    let r = s.refund(a.id, 2 * C, "refund:r1", None).await.unwrap();
    assert_eq!((r.state, r.code, r.amount_micros, r.debit_account, r.credit_account), (TransferState::Posted, TransferCode::Refund, 2 * C, OPERATOR_REVENUE, a.id));
    assert_eq!(s.refund(a.id, 2 * C, "refund:r1", None).await.unwrap(), r, "a retry is the same refund");
    let conflict = Err(LedgerError::IdempotencyConflict { key: "refund:r1".into() });
    assert_eq!(s.refund(a.id, C, "refund:r1", None).await.map(|_| ()), conflict, "one refund per key");
    assert_eq!(s.get_account(a.id).await.unwrap().balance_micros, 9 * C);
    assert_eq!(s.get_account(OPERATOR_REVENUE).await.unwrap().balance_micros, C);
    assert_eq!(s.get_account(TREASURY).await.unwrap().balance_micros, -10 * C, "no new money");
    let to_revenue = s.refund(OPERATOR_REVENUE, C, "refund:self", None).await;
    assert!(matches!(to_revenue, Err(LedgerError::KindNotAllowed { .. } | LedgerError::SelfTransfer)), "{to_revenue:?}");
    assert!(matches!(s.refund(TREASURY, C, "refund:t", None).await, Err(LedgerError::KindNotAllowed { .. })));
    let statement = s.statement(a.id, None, 100).await.unwrap();
    assert!(statement.items.iter().any(|t| t.id == r.id && t.code == TransferCode::Refund), "on the customer's statement");
    assert_check_ok(&*s).await;
}

pub async fn idempotent_retries<S: LedgerStore>(s: Arc<S>) {
    let a = funded(&*s, "a", 0).await;
    let b = funded(&*s, "b", 0).await;
    let m1 = s.mint(a.id, 5 * C, "m", None).await.unwrap();
    let m2 = s.mint(a.id, 5 * C, "m", None).await.unwrap();
    assert_eq!(m1, m2);
    assert_eq!(s.get_account(a.id).await.unwrap().balance_micros, 5 * C);
    let t1 = s.transfer(a.id, b.id, C, "t", None).await.unwrap();
    assert_eq!(s.transfer(a.id, b.id, C, "t", None).await.unwrap(), t1);
    let h1 = s.hold(a.id, 2 * C, "h", 60_000, T0).await.unwrap();
    let h2 = s.hold(a.id, 2 * C, "h", 60_000, T0 + 5).await.unwrap();
    assert_eq!(h1, h2);
    assert_eq!(s.get_account(a.id).await.unwrap().pending_micros, 2 * C);
    let s1 = s.settle(h1.id, C, T0 + 10, Some(leaf_fn())).await.unwrap();
    let s2 = s.settle(h1.id, C, T0 + 20, Some(leaf_fn())).await.unwrap();
    assert_eq!(s1, s2);
    assert_eq!(s1.log_index, Some(0));
    assert_eq!(s.log_size().await.unwrap(), 1);
    let v1 = s.hold(a.id, C, "h2", 60_000, T0).await.unwrap();
    s.void(v1.id).await.unwrap();
    assert_eq!(s.void(v1.id).await.unwrap().state, TransferState::Voided);
    let acc = s.get_account(a.id).await.unwrap();
    assert_eq!((acc.balance_micros, acc.pending_micros), (3 * C, 0));
    // A retry whose first attempt spent the funds it needs still replays (not a 402).
    let all = s.transfer(a.id, b.id, 3 * C, "all", None).await.unwrap();
    assert_eq!(s.transfer(a.id, b.id, 3 * C, "all", None).await.unwrap(), all);
    let c = funded(&*s, "c", 2 * C).await;
    let whole = s.hold(c.id, 2 * C, "whole", 60_000, T0).await.unwrap();
    assert_eq!(s.hold(c.id, 2 * C, "whole", 60_000, T0 + 1).await.unwrap(), whole);
    let conflict = Err(LedgerError::IdempotencyConflict { key: "whole".into() });
    assert_eq!(s.hold(c.id, 3 * C, "whole", 60_000, T0).await.map(|_| ()), conflict);
    assert_eq!(s.get_account(c.id).await.unwrap().pending_micros, 2 * C);
    assert_check_ok(&*s).await;
}

pub async fn idempotency_conflicts<S: LedgerStore>(s: Arc<S>) {
    let a = funded(&*s, "a", 10 * C).await;
    let b = funded(&*s, "b", 0).await;
    let conflict = |k: &str| Err(LedgerError::IdempotencyConflict { key: k.to_owned() });
    s.mint(a.id, C, "k1", None).await.unwrap();
    assert_eq!(s.mint(a.id, 2 * C, "k1", None).await.map(|_| ()), conflict("k1"));
    assert_eq!(s.mint(b.id, C, "k1", None).await.map(|_| ()), conflict("k1"));
    assert_eq!(s.transfer(a.id, b.id, C, "k1", None).await.map(|_| ()), conflict("k1"));
    assert_eq!(s.hold(a.id, C, "k1", 1000, T0).await.map(|_| ()), conflict("k1"));
    let h = s.hold(a.id, C, "h", 1000, T0).await.unwrap();
    assert_eq!(s.hold(a.id, C, "h", 2000, T0).await.map(|_| ()), conflict("h"));
    s.settle(h.id, C / 2, T0 + 1, None).await.unwrap();
    let key = settle_key(h.id);
    assert_eq!(s.settle(h.id, C / 3, T0 + 2, None).await.map(|_| ()), conflict(&key));
    // A voided hold moved nothing: its key, asked again for another amount, answers with the
    // voided hold (the caller takes its next attempt) instead of refusing.
    let v = s.hold(a.id, C, "v", 1000, T0).await.unwrap();
    s.void(v.id).await.unwrap();
    let again = s.hold(a.id, 2 * C, "v", 2000, T0).await.unwrap();
    assert_eq!((again.id, again.state), (v.id, TransferState::Voided));
    assert_eq!(s.mint(a.id, C, "v", None).await.map(|_| ()), conflict("v"), "not a hold: still refused");
    assert_eq!(s.get_account(a.id).await.unwrap().balance_micros, 11 * C - C / 2);
    assert_check_ok(&*s).await;
}

pub async fn rejects_bad_requests<S: LedgerStore>(s: Arc<S>) {
    let a = funded(&*s, "a", 10 * C).await;
    let b = funded(&*s, "b", 0).await;
    let missing = AccountId(0xdead_beef_u128 << 64);
    assert_eq!(s.transfer(a.id, a.id, C, "self", None).await, Err(LedgerError::SelfTransfer));
    for amount in [0, -1, i64::MIN, i64::MAX, MAX_AMOUNT_MICROS + 1] {
        let e = Err(LedgerError::InvalidAmount { amount_micros: amount });
        assert_eq!(s.transfer(a.id, b.id, amount, "neg", None).await, e);
        assert_eq!(s.mint(a.id, amount, "neg", None).await, e);
        assert_eq!(s.hold(a.id, amount, "neg", 1000, T0).await, e);
    }
    assert_eq!(s.mint(missing, C, "u1", None).await, Err(LedgerError::UnknownAccount(missing)));
    assert_eq!(s.transfer(a.id, missing, C, "u2", None).await, Err(LedgerError::UnknownAccount(missing)));
    assert_eq!(s.transfer(missing, a.id, C, "u3", None).await, Err(LedgerError::UnknownAccount(missing)));
    assert_eq!(s.hold(missing, C, "u4", 1000, T0).await, Err(LedgerError::UnknownAccount(missing)));
    let unknown = TransferId(42);
    assert_eq!(s.settle(unknown, 1, T0, None).await, Err(LedgerError::UnknownTransfer(unknown)));
    assert_eq!(s.void(unknown).await, Err(LedgerError::UnknownTransfer(unknown)));
    assert!(matches!(s.transfer(OPERATOR_REVENUE, a.id, 1, "op", None).await, Err(LedgerError::KindNotAllowed { .. })));
    assert!(matches!(s.transfer(TREASURY, a.id, 1, "tr", None).await, Err(LedgerError::KindNotAllowed { .. })));
    assert!(matches!(s.transfer(a.id, TREASURY, 1, "tr2", None).await, Err(LedgerError::KindNotAllowed { .. })));
    assert!(matches!(s.mint(TREASURY, 1, "tm", None).await, Err(LedgerError::InvalidArgument(m)) if m.contains("not to the treasury")));
    // Minted into revenue, money would be income that no one paid.
    assert!(matches!(s.mint(OPERATOR_REVENUE, 1, "mr", None).await, Err(LedgerError::KindNotAllowed { .. })));
    assert!(matches!(s.hold(OPERATOR_REVENUE, 1, "oh", 1000, T0).await, Err(LedgerError::KindNotAllowed { .. })));
    for key in ["", "~post:x"] {
        assert!(matches!(s.mint(a.id, 1, key, None).await, Err(LedgerError::InvalidArgument(_))));
    }
    assert!(matches!(s.mint(a.id, 1, &"k".repeat(129), None).await, Err(LedgerError::InvalidArgument(_))));
    for timeout in [0, -5, MAX_TIMEOUT_MS + 1] {
        assert!(matches!(s.hold(a.id, 1, "to", timeout, T0).await, Err(LedgerError::InvalidArgument(_))));
    }
    let t = s.transfer(a.id, b.id, C, "posted", None).await.unwrap();
    assert!(matches!(s.settle(t.id, 1, T0, None).await, Err(LedgerError::NotPending { .. })));
    assert!(matches!(s.void(t.id).await, Err(LedgerError::NotPending { .. })));
    // Nothing above moved money except the one transfer.
    assert_eq!(s.get_account(a.id).await.unwrap().balance_micros, 9 * C);
    let r = assert_check_ok(&*s).await;
    assert_eq!(r.transfers, 2);
}

pub async fn hold_settle_void<S: LedgerStore>(s: Arc<S>) {
    let a = funded(&*s, "a", 10 * C).await;
    let h1 = s.hold(a.id, 6 * C, "h1", 60_000, T0).await.unwrap();
    assert_eq!((h1.state, h1.hold, h1.expires_at_ms), (TransferState::Pending, true, T0 + 60_000));
    assert_eq!((h1.debit_account, h1.credit_account, h1.code), (a.id, OPERATOR_REVENUE, TransferCode::UsageCharge));
    let acc = s.get_account(a.id).await.unwrap();
    assert_eq!((acc.balance_micros, acc.pending_micros, acc.available_micros()), (10 * C, 6 * C, 4 * C));
    let short = s.hold(a.id, 5 * C, "h2", 60_000, T0).await;
    assert_eq!(short, Err(LedgerError::InsufficientFunds { shortfall_micros: C }));
    assert!(matches!(s.transfer(a.id, OPERATOR_REVENUE, 5 * C, "tx", None).await, Err(LedgerError::InsufficientFunds { .. })));
    assert_check_ok(&*s).await;
    let st = s.settle(h1.id, 2 * C, T0 + 1, None).await.unwrap();
    let posted = st.posted.clone().unwrap();
    assert_eq!((st.hold.state, st.released_micros, st.log_index), (TransferState::Posted, 4 * C, None));
    assert_eq!((posted.amount_micros, posted.pending_id, posted.state), (2 * C, Some(h1.id), TransferState::Posted));
    let acc = s.get_account(a.id).await.unwrap();
    assert_eq!((acc.balance_micros, acc.pending_micros), (8 * C, 0));
    assert_eq!(s.get_account(OPERATOR_REVENUE).await.unwrap().balance_micros, 2 * C);
    assert!(matches!(s.void(h1.id).await, Err(LedgerError::NotPending { .. })));
    let h3 = s.hold(a.id, 8 * C, "h3", 60_000, T0).await.unwrap();
    assert_eq!(s.void(h3.id).await.unwrap().state, TransferState::Voided);
    assert!(matches!(s.settle(h3.id, 1, T0 + 2, None).await, Err(LedgerError::NotPending { .. })));
    assert_eq!(s.get_account(a.id).await.unwrap().available_micros(), 8 * C);
    assert_check_ok(&*s).await;
}

pub async fn settle_edge_cases<S: LedgerStore>(s: Arc<S>) {
    let a = funded(&*s, "a", 10 * C).await;
    let h = s.hold(a.id, 3 * C, "h", 1000, T0).await.unwrap();
    let over = s.settle(h.id, 3 * C + 1, T0, None).await;
    assert_eq!(over, Err(LedgerError::SettleExceedsHold { held_micros: 3 * C, requested_micros: 3 * C + 1 }));
    assert!(s.settle(h.id, -1, T0, None).await.is_err());
    let zero = s.settle(h.id, 0, T0 + 1, Some(leaf_fn())).await.unwrap();
    assert_eq!((zero.hold.state, zero.posted.clone(), zero.released_micros, zero.log_index), (TransferState::Voided, None, 3 * C, None));
    assert_eq!(s.settle(h.id, 0, T0 + 2, None).await.unwrap().hold, zero.hold);
    let full = s.hold(a.id, 10 * C, "full", 1000, T0).await.unwrap();
    s.settle(full.id, 10 * C, T0 + 999, None).await.unwrap();
    let acc = s.get_account(a.id).await.unwrap();
    assert_eq!((acc.balance_micros, acc.pending_micros), (0, 0));
    assert_eq!(s.log_size().await.unwrap(), 0);
    assert_check_ok(&*s).await;
}

pub async fn expire_holds<S: LedgerStore>(s: Arc<S>) {
    let a = funded(&*s, "a", 10 * C).await;
    let mut holds = Vec::new();
    for i in 0..5 {
        holds.push(s.hold(a.id, C, &format!("e{i}"), 1000 + i, T0).await.unwrap());
    }
    let long = s.hold(a.id, C, "long", 100_000, T0).await.unwrap();
    assert_eq!(s.expire_holds(T0 + 999).await.unwrap(), 0);
    assert_eq!(s.settle(holds[0].id, 1, T0 + 1000, None).await, Err(LedgerError::HoldExpired(holds[0].id)));
    assert_eq!(s.expire_holds(T0 + 1002).await.unwrap(), 3);
    assert_eq!(s.expire_holds(T0 + 2000).await.unwrap(), 2);
    assert_eq!(s.expire_holds(T0 + 2000).await.unwrap(), 0);
    for h in &holds {
        assert!(matches!(s.settle(h.id, 1, T0 + 2001, None).await, Err(LedgerError::NotPending { .. })));
    }
    assert_eq!(s.get_account(a.id).await.unwrap().pending_micros, C);
    s.settle(long.id, C, T0 + 2001, None).await.unwrap();
    let acc = s.get_account(a.id).await.unwrap();
    assert_eq!((acc.balance_micros, acc.pending_micros), (9 * C, 0));
    assert_check_ok(&*s).await;
}

pub async fn extend_holds<S: LedgerStore>(s: Arc<S>) {
    let a = funded(&*s, "a", 10 * C).await;
    let live = s.hold(a.id, C, "x1", 1000, T0).await.unwrap();
    let idle = s.hold(a.id, C, "x2", 1000, T0).await.unwrap();
    let done = s.hold(a.id, C, "x3", 1000, T0).await.unwrap();
    s.settle(done.id, 1, T0 + 10, None).await.unwrap();
    // Only pending holds move, and never to an earlier expiry.
    assert_eq!(s.extend_holds(&[live.id, done.id], T0 + 5000).await.unwrap(), 1);
    assert_eq!(s.extend_holds(&[live.id], T0 + 10).await.unwrap(), 0);
    assert_eq!(s.extend_holds(&[], T0 + 10).await.unwrap(), 0);
    assert_eq!(s.expire_holds(T0 + 1001).await.unwrap(), 1, "only the idle hold expires");
    assert!(matches!(s.settle(idle.id, 1, T0 + 1002, None).await, Err(LedgerError::NotPending { .. })));
    s.settle(live.id, C, T0 + 4000, None).await.unwrap();
    let too_many = vec![live.id; tokenomy_ledger::sqlite::MAX_EXPIRE_PER_CALL as usize + 1];
    assert!(matches!(s.extend_holds(&too_many, T0).await, Err(LedgerError::InvalidArgument(_))));
    assert_check_ok(&*s).await;
}

pub async fn concurrent_holds_never_overdraw<S: LedgerStore>(s: Arc<S>) {
    let a = funded(&*s, "a", 10 * C + C / 2).await;
    let mut tasks = Vec::new();
    for i in 0..200u64 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let h = s.hold(a.id, C, &format!("c{i}"), 60_000, T0).await?;
            let amount = (i as i64 % 3 + 1) * C / 4;
            let st = s.settle(h.id, amount, T0 + 1, Some(leaf_fn())).await?;
            Ok::<_, LedgerError>(st)
        }));
    }
    let mut posted = 0;
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(st) => {
                ok += 1;
                posted += st.posted.unwrap().amount_micros;
            }
            Err(LedgerError::InsufficientFunds { shortfall_micros }) => assert!(shortfall_micros > 0),
            Err(e) => panic!("unexpected error {e}"),
        }
        let acc = s.get_account(a.id).await.unwrap();
        assert!(acc.available_micros() >= 0);
    }
    assert!((10..200).contains(&ok), "{ok} holds succeeded");
    let acc = s.get_account(a.id).await.unwrap();
    assert_eq!(acc.pending_micros, 0);
    assert_eq!(10 * C + C / 2 - acc.balance_micros, posted);
    assert_eq!(s.get_account(OPERATOR_REVENUE).await.unwrap().balance_micros, posted);
    assert_eq!(s.log_size().await.unwrap(), ok);
    let log = s.log_entries(0, 1000).await.unwrap();
    assert!(log.iter().enumerate().all(|(i, e)| e.log_index == i as u64 && e.account_id == a.id));
    assert_check_ok(&*s).await;
}

pub async fn leaf_appended_atomically<S: LedgerStore>(s: Arc<S>) {
    let a = funded(&*s, "a", 0).await;
    let b = funded(&*s, "b", 0).await;
    let m = s.mint(a.id, 10 * C, "m", Some(leaf_fn())).await.unwrap();
    let t = s.transfer(a.id, b.id, C, "t", Some(leaf_fn())).await.unwrap();
    let h = s.hold(a.id, 2 * C, "h", 60_000, T0).await.unwrap();
    let too_big: Leaf = Arc::new(|_, _| vec![0u8; MAX_LEAF_LEN_BYTES + 1]);
    assert!(matches!(s.settle(h.id, C, T0 + 1, Some(too_big)).await, Err(LedgerError::InvalidArgument(_))));
    let panics: Leaf = Arc::new(|_, _| panic!("leaf panics"));
    assert!(s.settle(h.id, C, T0 + 1, Some(panics)).await.is_err());
    // The failed settlements left no charge and no log entry behind.
    let acc = s.get_account(a.id).await.unwrap();
    assert_eq!((acc.balance_micros, acc.pending_micros), (9 * C, 2 * C));
    assert_eq!(s.log_size().await.unwrap(), 2);
    let st = s.settle(h.id, C, T0 + 2, Some(leaf_fn())).await.unwrap();
    assert_eq!(st.log_index, Some(2));
    let posted = st.posted.unwrap();
    let log = s.log_entries(0, 10).await.unwrap();
    let ids: Vec<_> = log.iter().map(|e| (e.log_index, e.transfer_id, e.account_id)).collect();
    assert_eq!(ids, vec![(0, m.id, a.id), (1, t.id, a.id), (2, posted.id, a.id)]);
    assert_eq!(log[2].leaf_bytes, leaf_fn()(2, &posted));
    assert_eq!(s.log_entries(1, 1).await.unwrap(), log[1..2].to_vec());
    assert!(s.log_entries(3, 10).await.unwrap().is_empty());
    assert!(s.log_entries(0, 0).await.is_err());
    assert_check_ok(&*s).await;
}

pub async fn statement_pages<S: LedgerStore>(s: Arc<S>) {
    let a = funded(&*s, "a", 100 * C).await;
    let b = funded(&*s, "b", 0).await;
    let mut expected = vec![];
    for i in 0..24 {
        let (from, to) = if i % 2 == 0 { (a.id, b.id) } else { (b.id, a.id) };
        expected.push(s.transfer(from, to, C, &format!("s{i}"), None).await.unwrap());
    }
    let mut seen = vec![];
    let mut cursor = None;
    let mut pages = 0;
    loop {
        let page = s.statement(b.id, cursor, 10).await.unwrap();
        pages += 1;
        seen.extend(page.items);
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(seen, expected);
    assert!(pages >= 3);
    let a_all = s.statement(a.id, None, 1000).await.unwrap();
    assert_eq!((a_all.items.len(), a_all.next_cursor), (25, None));
    assert_eq!(a_all.items[0].code, TransferCode::Mint);
    assert!(s.statement(a.id, None, 0).await.is_err());
    assert!(s.statement(a.id, None, MAX_PAGE_LEN + 1).await.is_err());
    assert!(s.statement(AccountId(7 << 100), None, 10).await.is_err());
    // Newest first: the same transfers in reverse, paged by the same kind of cursor.
    let (mut newest, mut cursor) = (vec![], None);
    loop {
        let page = s.statement_newest_first(b.id, cursor, 7).await.unwrap();
        newest.extend(page.items);
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(newest, expected.iter().rev().cloned().collect::<Vec<_>>());
    assert_eq!(s.statement_newest_first(a.id, None, 1).await.unwrap().items, [expected[23].clone()]);
    // A page that holds exactly the rest says there is no next one, in either order.
    let exact = s.statement(a.id, None, 25).await.unwrap();
    assert_eq!((exact.items.len(), exact.next_cursor), (25, None));
    let exact = s.statement_newest_first(a.id, None, 25).await.unwrap();
    assert_eq!((exact.items.len(), exact.next_cursor), (25, None));
    let last = s.statement(a.id, s.statement(a.id, None, 24).await.unwrap().next_cursor, 1).await.unwrap();
    assert_eq!((last.items.len(), last.next_cursor), (1, None));
    assert!(s.statement_newest_first(a.id, None, 0).await.is_err());
    assert!(s.statement_newest_first(AccountId(7 << 100), None, 10).await.is_err());
    assert_check_ok(&*s).await;
}

pub async fn api_keys<S: LedgerStore>(s: Arc<S>) {
    let a = funded(&*s, "a", 0).await;
    let scopes = vec!["chat".to_owned(), "models:read".to_owned()];
    let caps = SpendCaps { day_micros: Some(5 * C), month_micros: Some(50 * C) };
    let none = SpendCaps::default();
    let k1 = s.create_key(a.id, [1; 32], &scopes, Some(60), Some(100_000), caps).await.unwrap();
    let k2 = s.create_key(a.id, [2; 32], &[], None, None, none).await.unwrap();
    let rec = s.find_key_by_hash([1; 32]).await.unwrap().unwrap();
    assert_eq!((rec.id, rec.account, rec.key_hash), (k1, a.id, [1; 32]));
    assert_eq!((rec.scopes.clone(), rec.rpm, rec.tpm, rec.caps), (scopes.clone(), Some(60), Some(100_000), caps));
    assert_eq!((rec.revoked_at_ms, rec.spend), (None, KeySpend::default()));
    assert!(s.create_key(a.id, [1; 32], &[], None, None, none).await.is_err());
    let missing = AccountId(9 << 100);
    assert_eq!(s.create_key(missing, [3; 32], &[], None, None, none).await, Err(LedgerError::UnknownAccount(missing)));
    assert!(s.create_key(a.id, [4; 32], &["a,b".to_owned()], None, None, none).await.is_err());
    let negative = SpendCaps { day_micros: Some(-1), month_micros: None };
    assert!(matches!(s.create_key(a.id, [5; 32], &[], None, None, negative).await, Err(LedgerError::InvalidArgument(_))));
    s.revoke_key(k1).await.unwrap();
    s.revoke_key(k1).await.unwrap();
    assert_eq!(s.find_key_by_hash([1; 32]).await.unwrap(), None);
    assert_eq!(s.find_key_by_hash([9; 32]).await.unwrap(), None);
    let keys = s.list_keys(a.id).await.unwrap();
    assert_eq!(keys.len(), 2);
    assert!(keys.iter().any(|k| k.id == k1 && k.revoked_at_ms.is_some()));
    assert!(keys.iter().any(|k| k.id == k2 && k.revoked_at_ms.is_none()));
    let bogus = KeyId(5);
    assert_eq!(s.revoke_key(bogus).await, Err(LedgerError::UnknownKey(bogus)));
}

/// A deterministic mixed workload from several tasks; read-back invariants hold throughout.
pub async fn mixed_workload_check<S: LedgerStore>(s: Arc<S>) {
    let users: Vec<Account> = {
        let mut v = vec![];
        for i in 0..4 {
            v.push(funded(&*s, &format!("u{i}"), 50 * C).await);
        }
        v
    };
    let mut tasks = Vec::new();
    for w in 0..8u64 {
        let (s, users) = (s.clone(), users.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0..25u64 {
                let from = &users[((w + i) % 4) as usize];
                let to = &users[((w + i + 1) % 4) as usize];
                let key = format!("w{w}-{i}");
                let _ = match i % 4 {
                    0 => s.transfer(from.id, to.id, (i as i64 + 1) * C / 10, &key, None).await.map(|_| ()),
                    1 => s.mint(from.id, C, &key, Some(leaf_fn())).await.map(|_| ()),
                    2 => match s.hold(from.id, 2 * C, &key, 60_000, T0).await {
                        Ok(h) => s.settle(h.id, (i as i64) * C / 20, T0 + 1, Some(leaf_fn())).await.map(|_| ()),
                        Err(e) => Err(e),
                    },
                    _ => s.hold(from.id, C, &key, 10, T0).await.map(|_| ()),
                };
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_check_ok(&*s).await;
    let expired = s.expire_holds(T0 + 10).await.unwrap();
    assert_eq!(expired, 8 * 6);
    let report = assert_check_ok(&*s).await;
    let total: i64 = {
        let mut sum = 0;
        for u in &users {
            let acc = s.get_account(u.id).await.unwrap();
            assert_eq!(acc.pending_micros, 0);
            sum += acc.balance_micros;
        }
        sum
    };
    let op = s.get_account(OPERATOR_REVENUE).await.unwrap().balance_micros;
    let treasury = s.get_account(TREASURY).await.unwrap().balance_micros;
    assert_eq!(total + op + treasury, 0);
    assert_eq!(report.accounts, 6);
}

/// Many jobs land in the same group-commit batch; the ones that fail (a leaf
/// closure panics, a settle exceeds its hold, funds run out) must not fail,
/// roll back or reorder the others, and duplicates must replay the original.
pub async fn batch_failures_are_isolated<S: LedgerStore>(s: Arc<S>) {
    let a = funded(&*s, "a", 60 * C).await;
    // Concurrent holds with the same key: one hold, every caller gets it back.
    let mut dup = Vec::new();
    for _ in 0..16 {
        let s = s.clone();
        dup.push(tokio::spawn(async move { s.hold(a.id, C, "same-key", 60_000, T0).await }));
    }
    let mut same = Vec::new();
    for t in dup {
        same.push(t.await.unwrap().unwrap());
    }
    assert!(same.iter().all(|h| *h == same[0]));
    assert_eq!(s.get_account(a.id).await.unwrap().pending_micros, C);
    s.void(same[0].id).await.unwrap();
    // 80 holds of 1 credit on 60 credits: 60 succeed, 20 are short, concurrently.
    let mut tasks = Vec::new();
    for i in 0..80u64 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move { s.hold(a.id, C, &format!("b{i}"), 60_000, T0).await }));
    }
    let mut holds = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Ok(h) => holds.push(h),
            Err(LedgerError::InsufficientFunds { .. }) => {}
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!(holds.len(), 60);
    assert_eq!(s.get_account(a.id).await.unwrap().available_micros(), 0);
    // Settle them all concurrently with a mix of failures and duplicates.
    let panics: Leaf = Arc::new(|_, _| panic!("leaf panics"));
    let mut tasks = Vec::new();
    for (i, h) in holds.iter().enumerate() {
        let copies = if i % 5 == 1 { 3 } else { 1 };
        for _ in 0..copies {
            let (s, h, panics) = (s.clone(), h.clone(), panics.clone());
            tasks.push(tokio::spawn(async move {
                let r = match i % 5 {
                    0 => s.settle(h.id, C / 2, T0 + 1, Some(panics)).await,
                    2 => s.settle(h.id, C + 1, T0 + 1, Some(leaf_fn())).await,
                    3 => s.settle(h.id, 0, T0 + 1, Some(leaf_fn())).await,
                    _ => s.settle(h.id, C / 4, T0 + 1, Some(leaf_fn())).await,
                };
                (i, r)
            }));
        }
    }
    let mut by_hold: std::collections::HashMap<usize, Vec<Settled>> = Default::default();
    for t in tasks {
        let (i, r) = t.await.unwrap();
        match (i % 5, r) {
            (0, Err(LedgerError::InvalidArgument(_))) => {}
            (2, Err(LedgerError::SettleExceedsHold { .. })) => {}
            (3, Ok(st)) => assert_eq!((st.posted, st.log_index, st.released_micros), (None, None, C)),
            (1 | 4, Ok(st)) => by_hold.entry(i).or_default().push(st),
            (k, r) => panic!("job kind {k}: unexpected {r:?}"),
        }
    }
    // Duplicated settles all got the same result, with the same log index.
    for results in by_hold.values() {
        assert!(results.iter().all(|r| *r == results[0]), "{results:?}");
        assert!(results[0].log_index.is_some());
    }
    let settled = by_hold.len() as u64;
    assert_eq!(settled, 24);
    // Failed settles left their holds pending; they can still be settled.
    let acc = s.get_account(a.id).await.unwrap();
    assert_eq!(acc.pending_micros, 24 * C);
    assert_eq!(acc.balance_micros, 60 * C - settled as i64 * (C / 4));
    assert_eq!(s.log_size().await.unwrap(), settled);
    let log = s.log_entries(0, 1000).await.unwrap();
    assert!(log.iter().enumerate().all(|(k, e)| e.log_index == k as u64));
    let mut indices: Vec<u64> = by_hold.values().map(|r| r[0].log_index.unwrap()).collect();
    indices.sort_unstable();
    assert_eq!(indices, (0..settled).collect::<Vec<_>>());
    for (k, e) in log.iter().enumerate() {
        let posted = by_hold.values().find(|r| r[0].log_index == Some(k as u64)).unwrap()[0].posted.clone().unwrap();
        assert_eq!((e.transfer_id, &e.leaf_bytes), (posted.id, &leaf_fn()(k as u64, &posted)));
    }
    for (i, h) in holds.iter().enumerate() {
        if i % 5 == 0 || i % 5 == 2 {
            s.settle(h.id, C, T0 + 2, None).await.unwrap();
        }
    }
    assert_eq!(s.get_account(a.id).await.unwrap().pending_micros, 0);
    assert_check_ok(&*s).await;
}

/// Writers hammering one account with hold + settle pairs never overdraw it
/// and the log stays dense, whatever the batching.
pub async fn concurrent_pairs_one_account<S: LedgerStore>(s: Arc<S>) {
    let a = funded(&*s, "a", 100 * C).await;
    let mut tasks = Vec::new();
    for w in 0..32u64 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut spent = 0;
            for i in 0..20u64 {
                match s.hold(a.id, C, &format!("p{w}-{i}"), 60_000, T0).await {
                    Ok(h) => {
                        let st = s.settle(h.id, C / 2 + (w as i64), T0 + 1, Some(leaf_fn())).await.unwrap();
                        spent += st.posted.unwrap().amount_micros;
                    }
                    Err(LedgerError::InsufficientFunds { .. }) => {}
                    Err(e) => panic!("unexpected {e}"),
                }
                assert!(s.get_account(a.id).await.unwrap().available_micros() >= 0);
            }
            spent
        }));
    }
    let mut spent = 0;
    for t in tasks {
        spent += t.await.unwrap();
    }
    let acc = s.get_account(a.id).await.unwrap();
    assert_eq!((acc.balance_micros, acc.pending_micros), (100 * C - spent, 0));
    assert_eq!(s.get_account(OPERATOR_REVENUE).await.unwrap().balance_micros, spent);
    let n = s.log_size().await.unwrap();
    assert_eq!(s.log_entries(0, 1000).await.unwrap().len() as u64, n);
    assert_check_ok(&*s).await;
}

/// Per-key spend caps: posted spend this UTC day/month plus every pending hold of
/// the key bound each new hold; periods roll over; voids and expiry release.
pub async fn spend_caps<S: LedgerStore>(s: Arc<S>) {
    let a = funded(&*s, "a", 100 * C).await;
    let b = funded(&*s, "b", 100 * C).await;
    let caps = SpendCaps { day_micros: Some(10 * C), month_micros: Some(15 * C) };
    let k = s.create_key(a.id, [11; 32], &[], None, None, caps).await.unwrap();
    let spend = |s: Arc<S>| async move { s.find_key_by_hash([11; 32]).await.unwrap().unwrap().spend };
    // T0 = 2023-11-14T22:13:20Z.
    let h1 = s.hold_for_key(a.id, k, 6 * C, "c1", 60_000, T0).await.unwrap();
    assert_eq!(h1.key_id, Some(k));
    assert_eq!(s.hold_for_key(a.id, k, 6 * C, "c1", 60_000, T0).await.unwrap().id, h1.id, "idempotent");
    assert!(matches!(s.hold(a.id, 6 * C, "c1", 60_000, T0).await, Err(LedgerError::IdempotencyConflict { .. })));
    let over = s.hold_for_key(a.id, k, 5 * C, "c2", 60_000, T0).await;
    assert_eq!(
        over,
        Err(LedgerError::SpendCapExceeded { period: "daily", cap_micros: 10 * C, remaining_micros: 4 * C, requested_micros: 5 * C })
    );
    assert_eq!(spend(s.clone()).await.pending_micros, 6 * C);
    let st = s.settle(h1.id, 3 * C, T0 + 1, None).await.unwrap();
    assert_eq!(st.posted.unwrap().key_id, Some(k));
    let sp = spend(s.clone()).await;
    assert_eq!((sp.pending_micros, sp.day_micros, sp.month_micros), (0, 3 * C, 3 * C));
    assert_eq!((sp.day, sp.month), (utc_day(T0), (2023 - 1970) * 12 + 10));
    let h2 = s.hold_for_key(a.id, k, 7 * C, "c3", 60_000, T0 + 2).await.unwrap();
    s.settle(h2.id, 7 * C, T0 + 3, None).await.unwrap();
    assert!(matches!(s.hold_for_key(a.id, k, 1, "c4", 60_000, T0 + 4).await, Err(LedgerError::SpendCapExceeded { period: "daily", remaining_micros: 0, .. })));
    // A plain hold on the same account is not the key's business.
    let plain = s.hold(a.id, 20 * C, "plain", 60_000, T0 + 4).await.unwrap();
    s.void(plain.id).await.unwrap();
    // The next UTC day: the daily counter starts again, the monthly one does not.
    let day2 = T0 + 86_400_000;
    assert!(matches!(
        s.hold_for_key(a.id, k, 6 * C, "c5", 60_000, day2).await,
        Err(LedgerError::SpendCapExceeded { period: "monthly", remaining_micros, .. }) if remaining_micros == 5 * C
    ));
    let h3 = s.hold_for_key(a.id, k, 5 * C, "c6", 60_000, day2).await.unwrap();
    s.void(h3.id).await.unwrap();
    s.void(h3.id).await.unwrap();
    assert_eq!(spend(s.clone()).await.pending_micros, 0);
    // Expiry releases the reservation too.
    s.hold_for_key(a.id, k, 2 * C, "c7", 1_000, day2).await.unwrap();
    assert_eq!(spend(s.clone()).await.pending_micros, 2 * C);
    assert_eq!(s.expire_holds(day2 + 5_000).await.unwrap(), 1);
    assert_eq!(spend(s.clone()).await.pending_micros, 0);
    // The next month: both counters start again.
    let december = T0 + 20 * 86_400_000;
    let h4 = s.hold_for_key(a.id, k, 10 * C, "c8", 60_000, december).await.unwrap();
    s.settle(h4.id, 0, december + 1, None).await.unwrap();
    let sp = spend(s.clone()).await;
    assert_eq!((sp.pending_micros, sp.day_micros, sp.month_micros), (0, 0, 0));
    // Another account's key, a revoked key, an unknown key.
    assert_eq!(s.hold_for_key(b.id, k, C, "x1", 60_000, december).await, Err(LedgerError::UnknownKey(k)));
    let kb = s.create_key(b.id, [12; 32], &[], None, None, caps).await.unwrap();
    s.revoke_key(kb).await.unwrap();
    assert_eq!(s.hold_for_key(b.id, kb, C, "x2", 60_000, december).await, Err(LedgerError::UnknownKey(kb)));
    assert_eq!(s.hold_for_key(b.id, KeyId(77), C, "x3", 60_000, december).await, Err(LedgerError::UnknownKey(KeyId(77))));
    assert_check_ok(&*s).await;
}

/// Concurrent requests through one capped key cannot overshoot its cap (the
/// failure mode of budgets checked outside the ledger transaction).
pub async fn spend_cap_holds_under_concurrency<S: LedgerStore>(s: Arc<S>) {
    let a = funded(&*s, "a", 1000 * C).await;
    let caps = SpendCaps { day_micros: Some(12 * C), month_micros: None };
    let k = s.create_key(a.id, [21; 32], &[], None, None, caps).await.unwrap();
    let now = lib_now();
    let mut tasks = Vec::new();
    for w in 0..40u64 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            match s.hold_for_key(a.id, k, C, &format!("w{w}"), 60_000, now).await {
                Ok(h) => {
                    let st = s.settle(h.id, C / 2, now + 1, Some(leaf_fn())).await.unwrap();
                    assert!(st.log_index.is_some());
                    1
                }
                Err(LedgerError::SpendCapExceeded { .. }) => 0,
                Err(e) => panic!("unexpected {e}"),
            }
        }));
    }
    let mut ok = 0;
    for t in tasks {
        ok += t.await.unwrap();
    }
    // Each hold reserves 1 credit: while holds are in flight at most 12 fit; settled
    // at half, more fit later. Never more than the cap is spent or reserved.
    let sp = s.find_key_by_hash([21; 32]).await.unwrap().unwrap().spend;
    assert_eq!(sp.pending_micros, 0);
    assert_eq!(sp.day_micros, ok * (C / 2));
    assert!(ok >= 12 && sp.day_micros <= 12 * C, "{ok} holds, spent {}", sp.day_micros);
    assert_eq!(s.get_account(a.id).await.unwrap().balance_micros, 1000 * C - ok * (C / 2));
    assert_check_ok(&*s).await;
}

/// A key's limits and caps can be replaced; its spend counters stay, and the new cap bounds
/// the next hold at once.
pub async fn key_limits_can_be_changed<S: LedgerStore>(s: Arc<S>) {
    let a = funded(&*s, "a", 100 * C).await;
    let caps = SpendCaps { day_micros: Some(3 * C), month_micros: None };
    let k = s.create_key(a.id, [31; 32], &[], Some(10), None, caps).await.unwrap();
    let h = s.hold_for_key(a.id, k, 2 * C, "l1", 60_000, T0).await.unwrap();
    s.settle(h.id, 2 * C, T0 + 1, None).await.unwrap();
    assert!(matches!(s.hold_for_key(a.id, k, 2 * C, "l2", 60_000, T0 + 2).await, Err(LedgerError::SpendCapExceeded { .. })));
    let raised = SpendCaps { day_micros: Some(5 * C), month_micros: Some(50 * C) };
    let rec = s.set_key_limits(k, KeyLimitsChange::all(None, Some(1000), raised)).await.unwrap();
    assert_eq!((rec.rpm, rec.tpm, rec.caps, rec.spend.day_micros), (None, Some(1000), raised, 2 * C));
    assert_eq!(s.find_key_by_hash([31; 32]).await.unwrap().unwrap(), rec);
    s.hold_for_key(a.id, k, 2 * C, "l3", 60_000, T0 + 3).await.unwrap();
    assert_eq!(s.set_key_limits(KeyId(99), KeyLimitsChange::all(None, None, raised)).await, Err(LedgerError::UnknownKey(KeyId(99))));
    let bad = SpendCaps { day_micros: Some(-1), month_micros: None };
    assert!(matches!(s.set_key_limits(k, KeyLimitsChange::all(None, None, bad)).await, Err(LedgerError::InvalidArgument(_))));
    assert_eq!(s.find_key_by_hash([31; 32]).await.unwrap().unwrap().caps, raised, "a refused change changes nothing");
    assert_eq!(s.get_key(k).await.unwrap(), s.find_key_by_hash([31; 32]).await.unwrap().unwrap());
    assert_eq!(s.get_key(KeyId(99)).await, Err(LedgerError::UnknownKey(KeyId(99))));
    assert_check_ok(&*s).await;
}

/// A change names the limits it sets and keeps the others, in one write: two admins changing
/// different limits of one key at once both get their change (a read, then a write of all four,
/// put back the other's old value).
pub async fn key_limit_changes_keep_what_they_do_not_name<S: LedgerStore>(s: Arc<S>) {
    let a = funded(&*s, "a", 10 * C).await;
    let caps = SpendCaps { day_micros: Some(3 * C), month_micros: Some(9 * C) };
    let k = s.create_key(a.id, [32; 32], &[], Some(10), Some(500), caps).await.unwrap();
    let rpm_only = KeyLimitsChange { rpm: Some(Some(20)), ..Default::default() };
    let rec = s.set_key_limits(k, rpm_only).await.unwrap();
    assert_eq!((rec.rpm, rec.tpm, rec.caps), (Some(20), Some(500), caps));
    let lift = KeyLimitsChange { tpm: Some(None), day_micros: Some(None), ..Default::default() };
    let rec = s.set_key_limits(k, lift).await.unwrap();
    assert_eq!((rec.rpm, rec.tpm, rec.caps), (Some(20), None, SpendCaps { day_micros: None, month_micros: Some(9 * C) }));
    assert_eq!(s.set_key_limits(k, KeyLimitsChange::default()).await.unwrap(), rec, "an empty change changes nothing");
    let bad = KeyLimitsChange { month_micros: Some(Some(-5)), rpm: Some(Some(1)), ..Default::default() };
    assert!(matches!(s.set_key_limits(k, bad).await, Err(LedgerError::InvalidArgument(_))));
    let zero_tpm = KeyLimitsChange { tpm: Some(Some(0)), ..Default::default() };
    assert!(matches!(s.set_key_limits(k, zero_tpm).await, Err(LedgerError::InvalidArgument(_))), "no limit is None, not 0");
    assert_eq!(s.get_key(k).await.unwrap(), rec, "a refused change changes nothing");
    assert!(matches!(s.create_key(a.id, [33; 32], &[], Some(0), None, SpendCaps::default()).await, Err(LedgerError::InvalidArgument(_))));
    let rounds = 40u32;
    let (s1, s2) = (s.clone(), s.clone());
    let rpms = tokio::spawn(async move {
        for i in 1..=rounds {
            s1.set_key_limits(k, KeyLimitsChange { rpm: Some(Some(i)), ..Default::default() }).await.unwrap();
        }
    });
    let caps = tokio::spawn(async move {
        for i in 1..=rounds {
            s2.set_key_limits(k, KeyLimitsChange { day_micros: Some(Some(i64::from(i) * C)), ..Default::default() }).await.unwrap();
        }
    });
    rpms.await.unwrap();
    caps.await.unwrap();
    let rec = s.get_key(k).await.unwrap();
    assert_eq!((rec.rpm, rec.tpm, rec.caps.day_micros, rec.caps.month_micros), (Some(rounds), None, Some(i64::from(rounds) * C), Some(9 * C)));
    assert_check_ok(&*s).await;
}

fn lib_now() -> i64 {
    tokenomy_ledger::now_ms()
}

/// A settlement stamped with a time of the day before (its request's, retried after
/// midnight) counts in the key's current day: it does not wipe that day's spend.
#[test]
fn a_late_settlement_counts_in_the_current_period() {
    let day2 = T0 + 86_400_000;
    let mut s = KeySpend::default();
    s.apply_hold(SpendCaps::default(), 5, T0).unwrap();
    s.apply_hold(SpendCaps::default(), 7, day2).unwrap();
    s.apply_settle(7, 7, day2).unwrap();
    s.apply_settle(5, 5, T0).unwrap();
    assert_eq!((s.day, s.day_micros, s.month_micros, s.pending_micros), (utc_day(day2), 12, 12, 0));
}

#[test]
fn utc_periods() {
    assert_eq!((utc_day(0), utc_month(0)), (0, 0));
    assert_eq!(utc_month(-1), -1, "1969-12");
    // 2024-02-29T23:59:59.999Z and the next millisecond.
    let leap = 1_709_251_199_999;
    assert_eq!((utc_month(leap), utc_month(leap + 1)), ((2024 - 1970) * 12 + 1, (2024 - 1970) * 12 + 2));
    assert_eq!(utc_day(leap + 1) - utc_day(leap), 1);
    // 2026-12-31T12:00:00Z → December; 2027-01-01T00:00:00Z → January.
    assert_eq!(utc_month(1_798_718_400_000), (2026 - 1970) * 12 + 11);
    assert_eq!(utc_month(1_798_761_600_000), (2027 - 1970) * 12);
}

/// A hold placed with a caller's fresh id says whose it is: of many calls with one
/// idempotency key in the same millisecond (plain and capped-key holds), exactly one gets its
/// own id back, all get the same hold, and it is held once. How a node tells the request that
/// runs from its duplicates, which `created_at_ms` could not within one millisecond.
pub async fn a_hold_placed_as_an_id_says_whose_it_is<S: LedgerStore>(s: Arc<S>) {
    let a = funded(&*s, "a", 100 * C).await;
    let k = s.create_key(a.id, [13; 32], &[], None, None, SpendCaps { day_micros: Some(50 * C), month_micros: None }).await.unwrap();
    for (key, capped) in [("same-ms", None), ("same-ms-capped", Some(k))] {
        let calls: Vec<_> = (0..16)
            .map(|_| {
                let (s, id) = (s.clone(), FreshTransferId::generate(T0));
                tokio::spawn(async move { (id.id(), s.hold_as(id, a.id, capped, 2 * C, key, 60_000, T0).await.unwrap()) })
            })
            .collect();
        let mut placed = Vec::new();
        for call in calls {
            placed.push(call.await.unwrap());
        }
        let own: Vec<_> = placed.iter().filter(|(id, t)| t.id == *id).collect();
        assert_eq!(own.len(), 1, "exactly one call placed the hold {key}: {placed:?}");
        assert!(placed.iter().all(|(_, t)| *t == own[0].1), "every call got the one hold");
        assert_eq!(own[0].1.key_id, capped);
        assert!(placed.iter().all(|(_, t)| t.created_at_ms == T0), "(which the creation time cannot tell)");
        // A later retry finds it too, under an id of its own.
        let retry = FreshTransferId::generate(T0 + 1);
        let retry_id = retry.id();
        let again = s.hold_as(retry, a.id, capped, 2 * C, key, 60_000, T0 + 1).await.unwrap();
        assert_eq!((again.id, again.id == retry_id), (own[0].1.id, false));
    }
    assert_eq!(s.get_account(a.id).await.unwrap().pending_micros, 4 * C, "held once per key");
    assert_eq!(s.find_key_by_hash([13; 32]).await.unwrap().unwrap().spend.pending_micros, 2 * C);
    assert_check_ok(&*s).await;
}
