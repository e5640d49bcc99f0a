//! The charging path through HTTP with the real model, on a real SQLite file and (when
//! `TOKENOMY_TEST_POSTGRES_URL` is set) a real PostgreSQL server: keys, holds, 402, settlement,
//! idempotency, tenant isolation, the admin API, receipts verified offline, the log.

use std::collections::HashSet;

use axum::http::StatusCode;
use serde_json::{json, Value};
use tokenomy_api::AppState;
use tokenomy_billing::{Billing, FirstRun, OpenOptions};
use tokenomy_receipts::{verify_bundle, verify_consistency_notes, ReceiptKind, VerifierKey};

use crate::{assert_error, engine_with, request, send, shared_engine, Reply, MODEL};
use std::sync::Arc;
use tokenomy_core::Backend;

pub struct Node {
    pub state: AppState,
    pub first: FirstRun,
    pub dir: tempfile::TempDir,
}

pub use tokenomy_ledger::testing::{fresh_database as fresh_pg, stores};

/// A billed node on a fresh data dir (SQLite) or a fresh PostgreSQL database named `db`.
pub async fn node(pg: Option<&str>, db: &str, env: &[(&str, &str)]) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let database_url = match pg {
        Some(u) => Some(fresh_pg(u, db).await),
        None => None,
    };
    let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let (b, first) = Billing::open(OpenOptions { data_dir: dir.path().into(), database_url, origin: Some("test.tokenomy/log".into()), env })
        .await
        .unwrap();
    let state = AppState::new(shared_engine(), Default::default()).with_billing(b, false);
    Node { state, first: first.unwrap(), dir }
}

impl Node {
    pub async fn call(&self, method: &str, uri: &str, body: Option<Value>, key: &str) -> Reply {
        let auth = format!("Bearer {key}");
        let body = body.map(|b| b.to_string());
        request(&self.state, method, uri, body.as_deref(), &[("authorization", &auth)]).await
    }

    pub async fn admin(&self, method: &str, uri: &str, body: Option<Value>) -> Value {
        let r = self.call(method, uri, body, &self.first.admin_key).await;
        assert!(r.status.is_success(), "{method} {uri}: {} {}", r.status, r.text);
        r.json()
    }

    /// A new user account with `micros` credits and an inference key.
    pub async fn funded(&self, name: &str, micros: i64) -> (String, String) {
        let a = self.admin("POST", "/admin/v1/accounts", Some(json!({"name": name, "kind": "user"}))).await;
        let id = a["id"].as_str().unwrap().to_string();
        if micros > 0 {
            self.admin("POST", &format!("/admin/v1/accounts/{id}/mint"), Some(json!({"amount_micros": micros, "idempotency_key": format!("fund-{name}")}))).await;
        }
        let k = self.admin("POST", &format!("/admin/v1/accounts/{id}/keys"), Some(json!({"scopes": ["inference"]}))).await;
        (id, k["key"].as_str().unwrap().to_string())
    }

    pub async fn balance(&self, id: &str) -> (i64, i64) {
        let a = self.admin("GET", &format!("/admin/v1/accounts/{id}"), None).await;
        (a["balance_micros"].as_i64().unwrap(), a["pending_micros"].as_i64().unwrap())
    }

    /// Every transfer of an account (all pages).
    pub async fn statement(&self, id: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut after = String::new();
        loop {
            let page = self.admin("GET", &format!("/admin/v1/accounts/{id}/transfers?limit=1000{after}"), None).await;
            out.extend(page["data"].as_array().unwrap().iter().cloned());
            match page["next_after"].as_u64() {
                Some(c) => after = format!("&after={c}"),
                None => return out,
            }
        }
    }

    pub async fn check(&self) -> Value {
        let c = self.admin("GET", "/admin/v1/ledger/check", None).await;
        assert_eq!(c["ok"], true, "{c}");
        assert_eq!(c["sum_micros"], 0, "{c}");
        c
    }

    pub fn key(&self) -> VerifierKey {
        VerifierKey::parse(std::fs::read_to_string(self.dir.path().join("node.pub")).unwrap().trim()).unwrap()
    }
}

fn chat(max_tokens: u32) -> Value {
    json!({"model": MODEL, "max_tokens": max_tokens, "temperature": 0,
           "messages": [{"role": "system", "content": "You are a concise assistant."}, {"role": "user", "content": "Name a color."}]})
}

/// `count` copies of `chat(8)` sent at once with `key`; the replies in order.
async fn concurrent_chats(n: &Node, key: &str, count: usize) -> Vec<Reply> {
    let tasks: Vec<_> = (0..count)
        .map(|_| {
            let (state, auth) = (n.state.clone(), format!("Bearer {key}"));
            tokio::spawn(async move {
                request(&state, "POST", "/v1/chat/completions", Some(&chat(8).to_string()), &[("authorization", &auth)]).await
            })
        })
        .collect();
    let mut replies = Vec::with_capacity(count);
    for t in tasks {
        replies.push(t.await.unwrap());
    }
    replies
}

/// Posted usage charges (the settled halves of holds) in a statement.
fn posted_usage(st: &[Value]) -> Vec<&Value> {
    st.iter().filter(|t| t["code"] == "usagecharge" && t["state"] == "posted" && !t["pending_id"].is_null()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_charged_request_has_a_receipt_that_verifies_offline() {
    for pg in stores() {
        let n = node(pg.as_deref(), "tokenomy_api_receipts", &[]).await;
        let user = n.first.user_key.clone();
        let acc = n.first.user_account.to_string();
        let (b0, _) = n.balance(&acc).await;
        let r = n.call("POST", "/v1/chat/completions", Some(chat(8)), &user).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let body = r.json();
        let rid = r.headers["tokenomy-receipt"].to_str().unwrap().to_string();
        assert_eq!(body["receipt"]["id"], rid.as_str());
        let amount = body["receipt"]["amount_micros"].as_i64().unwrap();
        assert!(amount > 0);
        let (b1, p1) = n.balance(&acc).await;
        assert_eq!((b0 - b1, p1), (amount, 0), "the balance drops by exactly the receipt");

        // The bundle verifies with only the public key, and says what the response said.
        let bundle = n.call("GET", &format!("/v1/receipts/{rid}"), None, &user).await;
        assert_eq!(bundle.status, StatusCode::OK, "{}", bundle.text);
        let v = verify_bundle(&bundle.text, &n.key()).unwrap();
        assert_eq!(v.receipt.amount_micros, -amount);
        assert_eq!(v.receipt.prompt_tokens, body["usage"]["prompt_tokens"].as_u64().unwrap());
        assert_eq!(v.receipt.completion_tokens, body["usage"]["completion_tokens"].as_u64().unwrap());
        assert_eq!(hex::encode(v.receipt.model_sha256), "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53");
        assert_eq!(v.receipt.account_id, acc);

        // Mints and transfers between accounts are receipted and verify the same way.
        let (other, other_key) = n.funded("receipt-peer", 0).await;
        let m = n.admin("POST", &format!("/admin/v1/accounts/{acc}/mint"), Some(json!({"amount_micros": 7, "idempotency_key": "rm"}))).await;
        let t = n
            .admin("POST", "/admin/v1/transfers", Some(json!({"from": acc, "to": other, "amount_micros": 3, "idempotency_key": "rt"})))
            .await;
        // A key reused for other parameters is refused with the code inference requests get.
        let admin = n.first.admin_key.clone();
        for (uri, body) in [
            (format!("/admin/v1/accounts/{acc}/mint"), json!({"amount_micros": 8, "idempotency_key": "rm"})),
            ("/admin/v1/transfers".to_string(), json!({"from": acc, "to": other, "amount_micros": 4, "idempotency_key": "rt"})),
        ] {
            let r = n.call("POST", &uri, Some(body), &admin).await;
            assert_eq!((r.status, r.json()["error"]["code"].as_str()), (StatusCode::CONFLICT, Some("idempotency_key_reused")), "{}", r.text);
        }
        for (doc, kind, amount) in [(&m, ReceiptKind::Mint, 7), (&t, ReceiptKind::Transfer, -3)] {
            let id = doc["receipt"]["id"].as_str().unwrap();
            let bundle = n.call("GET", &format!("/v1/receipts/{id}"), None, &user).await;
            assert_eq!(bundle.status, StatusCode::OK, "{}", bundle.text);
            let v = verify_bundle(&bundle.text, &n.key()).unwrap();
            assert_eq!((v.receipt.kind, v.receipt.amount_micros), (kind, amount));
            assert_eq!(v.receipt.transfer_id, doc["transfer"]["id"].as_str().unwrap());
            // The other party is named in the signed bytes (a v2 receipt).
            let counterparty = if kind == ReceiptKind::Mint { tokenomy_ledger::TREASURY.to_string() } else { other.clone() };
            assert_eq!((v.receipt.version, v.receipt.counterparty_id.as_str()), (2, counterparty.as_str()));
        }
        // The recipient of a transfer can fetch its receipt; an account that took no part cannot.
        let id = t["receipt"]["id"].as_str().unwrap();
        let theirs = n.call("GET", &format!("/v1/receipts/{id}"), None, &other_key).await;
        assert_eq!(verify_bundle(&theirs.text, &n.key()).unwrap().receipt.counterparty_id, other);
        // ...and finds it on its statement: each line links to its receipt.
        let lines = n.call("GET", "/v1/me/transfers", None, &other_key).await.json();
        let line = lines["data"].as_array().unwrap().iter().find(|l| l["id"] == t["transfer"]["id"]).expect("the transfer is on the statement").clone();
        assert_eq!(line["receipt_id"], id, "{line}");
        let (_, stranger) = n.funded("receipt-stranger", 0).await;
        assert_error(&n.call("GET", &format!("/v1/receipts/{id}"), None, &stranger).await, StatusCode::NOT_FOUND);

        // A stream carries the receipt in its last chunk.
        let mut req = chat(4);
        req["stream"] = json!(true);
        req["stream_options"] = json!({"include_usage": true});
        let s = n.call("POST", "/v1/chat/completions", Some(req), &user).await;
        let data = s.sse_data();
        let last: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
        assert!(last["usage"].is_object() && last["receipt"]["id"].is_string(), "{last}");
        assert_eq!(last["receipt"]["id"], s.headers["tokenomy-receipt"].to_str().unwrap());

        // Checkpoints: more requests later, and the log provably only grew.
        let old_note = n.call("GET", "/v1/log/checkpoint", None, "").await.text;
        assert!(old_note.starts_with("test.tokenomy/log\n"), "{old_note}");
        n.call("POST", "/v1/chat/completions", Some(chat(2)), &user).await;
        let new_note = n.call("GET", "/v1/log/checkpoint", None, "").await.text;
        let size = |note: &str| note.lines().nth(1).unwrap().parse::<u64>().unwrap();
        let (old, new) = (size(&old_note), size(&new_note));
        assert!(new > old);
        let proof = n.call("GET", &format!("/v1/log/consistency?old={old}&new={new}"), None, "").await.json();
        let hashes: Vec<[u8; 32]> = proof["proof"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| {
                use base64::Engine;
                base64::engine::general_purpose::STANDARD.decode(h.as_str().unwrap()).unwrap().try_into().unwrap()
            })
            .collect();
        verify_consistency_notes(&old_note, &new_note, &hashes, &n.key()).unwrap();
        // A malformed query is an error in the API's shape too.
        let bad = n.call("GET", "/v1/log/consistency?old=abc&new=2", None, "").await;
        assert!(assert_error(&bad, StatusCode::BAD_REQUEST)["message"].as_str().unwrap().contains("query string"));
        let key_text = n.call("GET", "/v1/node/key", None, "").await.text;
        assert_eq!(key_text.trim(), n.key().to_string());
        n.check().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_charge_is_refunded_once_with_a_receipt_the_customer_can_verify() {
    for pg in stores() {
        let n = node(pg.as_deref(), "tokenomy_api_refunds", &[]).await;
        let (acc, key) = n.funded("refunded", 1_000_000).await;
        let r = n.call("POST", "/v1/chat/completions", Some(chat(8)), &key).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let charge = r.json()["receipt"].clone();
        let (rid, charged) = (charge["id"].as_str().unwrap().to_string(), charge["amount_micros"].as_i64().unwrap());
        let (b1, _) = n.balance(&acc).await;
        let url = format!("/admin/v1/receipts/{rid}/refund");
        // Only the operator refunds; only charges, by at most what they charged.
        assert_error(&n.call("POST", &url, Some(json!({})), &key).await, StatusCode::FORBIDDEN);
        // (`null` is refused too: a script's missing value must not refund everything.)
        for bad in [json!({"amount_micros": charged + 1}), json!({"amount_micros": 0}), json!({"amount_micros": -5}), json!({"amount_micros": null})] {
            let e = assert_error(&n.call("POST", &url, Some(bad.clone()), &n.first.admin_key).await, StatusCode::BAD_REQUEST);
            assert_eq!(e["param"], "amount_micros", "{bad}: {e}");
        }
        let minted = n.admin("POST", &format!("/admin/v1/accounts/{acc}/mint"), Some(json!({"amount_micros": 5, "idempotency_key": "refund-mint"}))).await;
        let mint_url = format!("/admin/v1/receipts/{}/refund", minted["receipt"]["id"].as_str().unwrap());
        assert_error(&n.call("POST", &mint_url, Some(json!({})), &n.first.admin_key).await, StatusCode::BAD_REQUEST);
        assert_error(&n.call("POST", "/admin/v1/receipts/rcpt_nope/refund", Some(json!({})), &n.first.admin_key).await, StatusCode::NOT_FOUND);
        assert_eq!(n.balance(&acc).await.0, b1 + 5, "nothing refunded by the refusals");

        let part = n.admin("POST", &url, Some(json!({"amount_micros": 1}))).await;
        assert_eq!((part["transfer"]["code"].as_str(), part["transfer"]["from"].as_str()), (Some("refund"), Some(tokenomy_ledger::OPERATOR_REVENUE.to_string().as_str())));
        assert_eq!(n.balance(&acc).await.0, b1 + 5 + 1);
        assert_eq!(n.admin("POST", &url, Some(json!({"amount_micros": 1}))).await, part, "a retry is the same refund");
        let again = n.call("POST", &url, Some(json!({})), &n.first.admin_key).await;
        assert!(assert_error(&again, StatusCode::CONFLICT)["message"].as_str().unwrap().contains("already refunded"), "{}", again.text);
        // No body at all is a full refund too (refused here: this receipt was refunded in part).
        assert_error(&n.call("POST", &url, None, &n.first.admin_key).await, StatusCode::CONFLICT);
        assert_eq!(n.balance(&acc).await.0, b1 + 5 + 1, "refunded once");

        // The customer fetches the refund's receipt, verifies it offline, and finds it on the statement.
        let id = part["receipt"]["id"].as_str().unwrap();
        let bundle = n.call("GET", &format!("/v1/receipts/{id}"), None, &key).await;
        assert_eq!(bundle.status, StatusCode::OK, "{}", bundle.text);
        let v = verify_bundle(&bundle.text, &n.key()).unwrap().receipt;
        assert_eq!((v.kind, v.amount_micros, v.account_id.as_str()), (ReceiptKind::Refund, 1, acc.as_str()));
        assert_eq!(v.counterparty_id, tokenomy_ledger::OPERATOR_REVENUE.to_string());
        assert_eq!(v.request_id, r.headers["x-request-id"].to_str().unwrap(), "the refund names the refunded request");
        let lines = n.call("GET", "/v1/me/transfers", None, &key).await.json();
        assert!(lines["data"].as_array().unwrap().iter().any(|l| l["code"] == "refund" && l["receipt_id"] == id), "{lines}");
        n.check().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_sends_credits_once_with_a_receipt_both_parties_verify() {
    for pg in stores() {
        let n = node(pg.as_deref(), "tokenomy_api_send", &[]).await;
        let (payer, inference_key) = n.funded("payer", 1_000).await;
        let (payee, payee_key) = n.funded("payee", 0).await;
        let grant = |scopes: Value, extra: Value| {
            let mut body = json!({"scopes": scopes});
            body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            body
        };
        let url = format!("/admin/v1/accounts/{payer}/keys");
        let key = n.admin("POST", &url, Some(grant(json!(["inference", "transfer"]), json!({"rpm": 100})))).await["key"].as_str().unwrap().to_string();
        let before = n.check().await;

        // Refused, and nothing moves: the scope is not an inference key's; a capped key may not
        // send (caps count requests); the transfer scope is a customer's only.
        let cap = json!({"spend_cap_day_micros": 10});
        let e = assert_error(&n.call("POST", &url, Some(grant(json!(["transfer"]), cap.clone())), &n.first.admin_key).await, StatusCode::BAD_REQUEST);
        assert!(e["message"].as_str().unwrap().contains("spend caps"), "{e}");
        let ops = format!("/admin/v1/accounts/{}/keys", tokenomy_ledger::OPERATOR_REVENUE);
        assert_error(&n.call("POST", &ops, Some(grant(json!(["transfer"]), json!({}))), &n.first.admin_key).await, StatusCode::BAD_REQUEST);
        let key_id = n.call("GET", "/v1/me", None, &key).await.json()["key_id"].as_str().unwrap().to_string();
        let capping = n.call("PATCH", &format!("/admin/v1/keys/{key_id}/limits"), Some(cap), &n.first.admin_key).await;
        assert_error(&capping, StatusCode::BAD_REQUEST);
        let send = |to: &str, amount: i64, k: &str| json!({"to": to, "amount_micros": amount, "idempotency_key": k});
        let e = assert_error(&n.call("POST", "/v1/transfers", Some(send(&payee, 5, "x")), &inference_key).await, StatusCode::FORBIDDEN);
        assert!(e["message"].as_str().unwrap().contains("transfer"), "{e}");
        let refusals = [
            (json!({"to": payee, "amount_micros": 5}), StatusCode::BAD_REQUEST, "idempotency_key"),
            (send(&payee, 0, "a"), StatusCode::BAD_REQUEST, "amount_micros"),
            (send(&payee, -5, "b"), StatusCode::BAD_REQUEST, "amount_micros"),
            (send(&payer, 5, "c"), StatusCode::BAD_REQUEST, "to"),
            (send("not-an-id", 5, "d"), StatusCode::BAD_REQUEST, "to"),
            (send("00000000000000000000000000000abc", 5, "e"), StatusCode::BAD_REQUEST, "to"),
            (send(&tokenomy_ledger::TREASURY.to_string(), 5, "f"), StatusCode::BAD_REQUEST, "to"),
            (send(&tokenomy_ledger::OPERATOR_REVENUE.to_string(), 5, "g"), StatusCode::BAD_REQUEST, "to"),
            (send(&payee, 1_001, "h"), StatusCode::PAYMENT_REQUIRED, ""),
        ];
        for (body, status, param) in refusals {
            let e = assert_error(&n.call("POST", "/v1/transfers", Some(body.clone()), &key).await, status);
            if !param.is_empty() {
                assert_eq!(e["param"], param, "{body}: {e}");
            }
        }
        let after = n.check().await;
        assert_eq!(before["transfers"], after["transfers"], "no refusal moved anything");

        // Sent once, whatever the retries; the same key for another amount is a 409.
        let auth = format!("Bearer {key}");
        let h = [("authorization", auth.as_str()), ("idempotency-key", "pay-1")];
        let body = json!({"to": payee, "amount_micros": 300}).to_string();
        let first = request(&n.state, "POST", "/v1/transfers", Some(&body), &h).await;
        assert_eq!(first.status, StatusCode::OK, "{}", first.text);
        assert_eq!(first.headers["x-ratelimit-limit-requests"], "100");
        let again = request(&n.state, "POST", "/v1/transfers", Some(&body), &h).await;
        assert_eq!(again.json(), first.json(), "a retry is the same transfer and receipt");
        let other = json!({"to": payee, "amount_micros": 301}).to_string();
        let e = assert_error(&request(&n.state, "POST", "/v1/transfers", Some(&other), &h).await, StatusCode::CONFLICT);
        assert_eq!(e["code"], "idempotency_key_reused");
        let mixed = json!({"to": payee, "amount_micros": 300, "idempotency_key": "pay-2"}).to_string();
        assert_error(&request(&n.state, "POST", "/v1/transfers", Some(&mixed), &h).await, StatusCode::BAD_REQUEST);
        // Two keys: which would it be? A retry under either must not send it twice.
        let two = [("authorization", auth.as_str()), ("idempotency-key", "pay-3"), ("idempotency-key", "pay-4")];
        let e = assert_error(&request(&n.state, "POST", "/v1/transfers", Some(&body), &two).await, StatusCode::BAD_REQUEST);
        assert!(e["message"].as_str().unwrap().contains("more than one Idempotency-Key"), "{e}");
        assert_eq!((n.balance(&payer).await, n.balance(&payee).await), ((700, 0), (300, 0)));
        // Another customer's identical key is its own transfer.
        let (payer2, _) = n.funded("payer2", 50).await;
        let key2 = n.admin("POST", &format!("/admin/v1/accounts/{payer2}/keys"), Some(grant(json!(["transfer"]), json!({})))).await["key"].as_str().unwrap().to_string();
        let r = n.call("POST", "/v1/transfers", Some(send(&payee, 50, "pay-1")), &key2).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        assert_eq!(n.balance(&payee).await, (350, 0));

        // Both parties fetch the receipt and verify it offline; it names the other party.
        let doc = first.json();
        let id = doc["receipt"]["id"].as_str().unwrap();
        for (k, account, amount) in [(&key, &payer, -300), (&payee_key, &payer, -300)] {
            let bundle = n.call("GET", &format!("/v1/receipts/{id}"), None, k).await;
            assert_eq!(bundle.status, StatusCode::OK, "{}", bundle.text);
            let v = verify_bundle(&bundle.text, &n.key()).unwrap().receipt;
            assert_eq!((v.kind, v.amount_micros, &v.account_id, &v.counterparty_id), (ReceiptKind::Transfer, amount, account, &payee));
            assert_eq!(v.key_id, key_id, "the receipt names the key that sent it");
        }
        let lines = n.call("GET", "/v1/me/transfers?order=desc", None, &payee_key).await.json();
        assert!(lines["data"].as_array().unwrap().iter().any(|l| l["receipt_id"] == id && l["from"] == payer.as_str()), "{lines}");
        n.check().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_never_overdraw_an_account() {
    for pg in stores() {
        let n = node(pg.as_deref(), "tokenomy_api_concurrent", &[]).await;
        // Worst case of one request: its prompt at the input price + 8 tokens at the output price.
        let probe = n.call("POST", "/v1/chat/completions", Some(chat(1)), &n.first.user_key).await.json();
        let prompt = probe["usage"]["prompt_tokens"].as_i64().unwrap();
        let worst = (prompt * 50_000 + 8 * 200_000).div_euclid(1_000_000) + 1;
        let (acc, key) = n.funded("busy", 10 * worst).await;
        let mut ok = 0;
        for r in concurrent_chats(&n, &key, 200).await {
            match r.status {
                StatusCode::OK => {
                    assert!(r.json()["choices"][0]["message"]["content"].is_string());
                    ok += 1;
                }
                StatusCode::PAYMENT_REQUIRED => {
                    let e = assert_error(&r, StatusCode::PAYMENT_REQUIRED);
                    assert_eq!(e["code"], "insufficient_quota");
                    assert!(e["message"].as_str().unwrap().contains("short by"), "{e}");
                }
                s => panic!("every request gets an answer or a 402, got {s}: {}", r.text),
            }
        }
        assert!(ok >= 10, "about ten requests are funded, {ok} answered");
        let (balance, pending) = n.balance(&acc).await;
        assert!(balance >= 0 && pending == 0, "balance {balance}, pending {pending}");
        let st = n.statement(&acc).await;
        let charged: i64 = posted_usage(&st).iter().map(|t| t["amount_micros"].as_i64().unwrap()).sum();
        assert_eq!(charged, 10 * worst - balance, "posted charges equal the drop in balance");
        assert_eq!(posted_usage(&st).len(), ok, "one posted charge per answer");
        n.check().await;
    }
}

/// A client that leaves before its answer (a timeout) does not cancel a request that has an
/// `Idempotency-Key`: it runs to its end, is charged once, and the client's retry is replayed
/// the whole answer, with its request id and receipt, rather than told it was charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_request_whose_client_left_runs_to_its_end_and_its_retry_gets_the_answer() {
    let n = node(None, "unused", &[]).await;
    let (acc, key) = n.funded("leaver", 1_000_000).await;
    let auth = format!("Bearer {key}");
    let h = [("authorization", auth.as_str()), ("idempotency-key", "left-1")];
    let mut body = chat(400);
    body["ignore_eos"] = json!(true);
    let body = body.to_string();
    // The client gives up after 300 ms, mid-generation: its handler is dropped.
    let first = tokio::time::timeout(std::time::Duration::from_millis(300), request(&n.state, "POST", "/v1/chat/completions", Some(&body), &h)).await;
    assert!(first.is_err(), "400 tokens took under 300 ms");
    // Retries meanwhile are told it is in progress; then one gets the answer.
    let mut retry = request(&n.state, "POST", "/v1/chat/completions", Some(&body), &h).await;
    for _ in 0..600 {
        if retry.status != StatusCode::CONFLICT {
            break;
        }
        assert_eq!(assert_error(&retry, StatusCode::CONFLICT)["code"], "idempotency_key_in_use");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        retry = request(&n.state, "POST", "/v1/chat/completions", Some(&body), &h).await;
    }
    assert_eq!(retry.status, StatusCode::OK, "{}", retry.text);
    assert_eq!(retry.headers["idempotent-replayed"], "true");
    let v = retry.json();
    assert_eq!(v["usage"]["completion_tokens"], 400, "the whole answer, not a cancelled one: {v}");
    assert_eq!(retry.headers["tokenomy-receipt"].to_str().unwrap(), v["receipt"]["id"].as_str().unwrap());
    assert!(retry.headers["x-request-id"].to_str().unwrap().len() >= 32);
    assert_eq!(posted_usage(&n.statement(&acc).await).len(), 1, "charged once");
    n.check().await;
}

/// A retry of `body` with headers `h` gets 409 saying it was charged, and `acc` still has
/// exactly one charge.
async fn retry_is_refused_as_charged(n: &Node, acc: &str, body: &str, h: &[(&str, &str)]) {
    let retry = request(&n.state, "POST", "/v1/chat/completions", Some(body), h).await;
    let e = assert_error(&retry, StatusCode::CONFLICT);
    assert!(e["message"].as_str().unwrap().contains("charged once"), "{e}");
    assert_eq!(e["code"], "idempotency_key_processed", "a code that says not to retry: {e}");
    assert_eq!(posted_usage(&n.statement(acc).await).len(), 1);
    n.check().await;
}

/// A streamed answer is not replayed, so its `Idempotency-Key` stays in flight on the node
/// until the stream ends: a duplicate meanwhile is refused as in progress (it is not run, and
/// cannot be mistaken for the first by the ledger), one after it is told the key was charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_stream_holds_its_key_until_it_ends() {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let n = node(None, "unused", &[]).await;
    let (acc, key) = n.funded("streamer", 1_000_000).await;
    let auth = format!("Bearer {key}");
    let h = [("authorization", auth.as_str()), ("idempotency-key", "stream-1")];
    let mut body = chat(64);
    body["stream"] = json!(true);
    let body = body.to_string();
    let req = axum::http::Request::post("/v1/chat/completions")
        .header("authorization", &auth)
        .header("idempotency-key", "stream-1")
        .header("content-type", "application/json")
        .body(axum::body::Body::from(body.clone()))
        .unwrap();
    let first = tokenomy_api::app(n.state.clone()).oneshot(req).await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    let dup = request(&n.state, "POST", "/v1/chat/completions", Some(&body), &h).await;
    assert_eq!(assert_error(&dup, StatusCode::CONFLICT)["code"], "idempotency_key_in_use");
    assert_eq!(dup.headers["retry-after"], "1", "a key in progress is worth retrying soon");
    let text = String::from_utf8(first.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    retry_is_refused_as_charged(&n, &acc, &body, &h).await;
}

/// A completion of a list of prompts, `n` choices each, reports and bills every prompt once
/// and every choice's completion tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_prompt_of_a_list_is_billed_once() {
    let n = node(None, "unused", &[]).await;
    let user = n.first.user_key.clone();
    let (a, b) = ("The sky is", "Two plus two is a sum that");
    let tokens = |t: &str| shared_engine().tokenize(MODEL, t, true).unwrap().len() as u64;
    let body = json!({"model": MODEL, "prompt": [a, b], "n": 2, "max_tokens": 3, "temperature": 0});
    let r = n.call("POST", "/v1/completions", Some(body), &user).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let v = r.json();
    assert_eq!(v["choices"].as_array().unwrap().len(), 4);
    assert_eq!(v["usage"]["prompt_tokens"].as_u64().unwrap(), tokens(a) + tokens(b));
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() >= 4, "every choice's tokens count: {v}");
    let rid = v["receipt"]["id"].as_str().unwrap();
    let bundle = n.call("GET", &format!("/v1/receipts/{rid}"), None, &user).await;
    let receipt = verify_bundle(&bundle.text, &n.key()).unwrap().receipt;
    assert_eq!(receipt.prompt_tokens, tokens(a) + tokens(b), "the receipt bills both prompts");
    assert_eq!(receipt.completion_tokens, v["usage"]["completion_tokens"].as_u64().unwrap());
    n.check().await;
}

#[tokio::test]
async fn me_shows_what_the_usage_would_have_cost_at_the_reference_list_price() {
    let n = node(None, "unused", &[]).await;
    let (_, key) = n.funded("saver", 10_000_000).await;
    let mut charged = 0;
    let mut reference = 0;
    for _ in 0..2 {
        let v = n.call("POST", "/v1/chat/completions", Some(chat(8)), &key).await.json();
        let u = &v["usage"];
        let (p, c, k) = (u["prompt_tokens"].as_i64().unwrap(), u["prompt_tokens_details"]["cached_tokens"].as_i64().unwrap(), u["completion_tokens"].as_i64().unwrap());
        // gpt-4o-mini's list price, as the shipped tokenomy.toml has it, rounded up per request.
        reference += ((p - c) * 150_000 + c * 75_000 + k * 600_000 + 999_999) / 1_000_000;
        charged += v["receipt"]["amount_micros"].as_i64().unwrap();
    }
    let me = n.call("GET", "/v1/me", None, &key).await.json();
    assert_eq!(me["usage"]["reference"], json!({"name": "gpt-4o-mini", "cost_micros": reference, "saved_micros": reference - charged}), "{me}");
    assert!(reference > charged, "SmolLM2 is priced below gpt-4o-mini here");
    let metrics = send(&n.state, "GET", "/metrics", None).await.text;
    assert!(metrics.contains(&format!("tokenomy_reference_cost_micros_total{{reference=\"gpt-4o-mini\",model=\"{MODEL}\"}} {reference}")), "{metrics}");
    // The node's counters are per model (the node's traffic; the usage reports are the ledger's).
    assert!(metrics.contains(&format!("tokenomy_charged_micros_total{{model=\"{MODEL}\"}} {charged}")), "{metrics}");
    assert!(metrics.contains(&format!("tokenomy_metered_requests_total{{model=\"{MODEL}\"}} 2")), "{metrics}");
}

/// `GET /v1/me/usage` and `GET /admin/v1/usage`: daily buckets in the shape of OpenAI's usage
/// API, counted from the receipts, and `/v1/me`'s all-time sum of them.
#[tokio::test]
async fn usage_is_reported_by_day_and_model_from_the_receipts() {
    let n = node(None, "unused", &[]).await;
    let (acc, key) = n.funded("reporter", 10_000_000).await;
    let mut charged = 0;
    let mut prompt = 0;
    for max_tokens in [3, 5] {
        let v = n.call("POST", "/v1/chat/completions", Some(chat(max_tokens)), &key).await.json();
        charged += v["receipt"]["amount_micros"].as_u64().unwrap();
        prompt += v["usage"]["prompt_tokens"].as_u64().unwrap();
    }
    let now_s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let (today, yesterday) = (now_s / 86_400 * 86_400, now_s / 86_400 * 86_400 - 86_400);
    let page = n.call("GET", &format!("/v1/me/usage?start_time={}&group_by=model", now_s - 86_400), None, &key).await.json();
    assert_eq!((&page["object"], &page["has_more"], &page["next_page"]), (&json!("page"), &json!(false), &Value::Null), "{page}");
    let buckets = page["data"].as_array().unwrap();
    assert_eq!(buckets.iter().map(|b| b["start_time"].as_u64().unwrap()).collect::<Vec<_>>(), [yesterday, today], "{page}");
    assert_eq!(buckets[0]["results"], json!([]), "a day without charges is an empty bucket");
    let r = &buckets[1]["results"][0];
    assert_eq!((&r["object"], &r["model"], &r["num_model_requests"]), (&json!("organization.usage.completions.result"), &json!(MODEL), &json!(2)), "{r}");
    assert_eq!((r["input_tokens"].as_u64(), r["charged_micros"].as_u64()), (Some(prompt), Some(charged)), "{r}");
    // Without group_by one result per day; the admin sees it by account or for the ledger.
    let mine = n.call("GET", &format!("/v1/me/usage?start_time={today}"), None, &key).await.json();
    let admin = n.admin("GET", &format!("/admin/v1/usage?start_time={today}&account_id={acc}"), None).await;
    assert_eq!(mine, admin);
    assert_eq!(mine["data"][0]["results"][0]["model"], Value::Null);
    assert_eq!(mine["data"][0]["results"][0]["output_tokens"], r["output_tokens"]);
    let ledger = n.admin("GET", &format!("/admin/v1/usage?start_time={today}"), None).await;
    assert!(ledger["data"][0]["results"][0]["num_model_requests"].as_u64().unwrap() >= 2, "{ledger}");
    // By key: a second key of the account has a row of its own.
    let k2 = n.admin("POST", &format!("/admin/v1/accounts/{acc}/keys"), Some(json!({"scopes": ["inference"]}))).await;
    let second = n.call("POST", "/v1/chat/completions", Some(chat(2)), k2["key"].as_str().unwrap()).await.json();
    let first_key = n.call("GET", "/v1/me", None, &key).await.json()["key_id"].clone();
    let by_key = n.call("GET", &format!("/v1/me/usage?start_time={today}&group_by=api_key_id"), None, &key).await.json();
    let rows: Vec<_> = by_key["data"][0]["results"].as_array().unwrap().iter().map(|r| (r["api_key_id"].clone(), r["num_model_requests"].clone(), r["model"].clone())).collect();
    let mut want = vec![(first_key, json!(2), Value::Null), (k2["key_id"].clone(), json!(1), Value::Null)];
    want.sort_by_key(|w| w.0.as_str().unwrap().to_string());
    assert_eq!(rows, want, "{by_key}");
    let both = n.admin("GET", &format!("/admin/v1/usage?start_time={today}&account_id={acc}&group_by=model,api_key_id"), None).await;
    assert_eq!(both["data"][0]["results"].as_array().unwrap().len(), 2, "{both}");
    assert_eq!(both["data"][0]["results"][0]["model"], MODEL, "{both}");
    charged += second["receipt"]["amount_micros"].as_u64().unwrap();
    let mine = n.call("GET", &format!("/v1/me/usage?start_time={today}"), None, &key).await.json();
    assert_eq!(mine["data"][0]["results"][0]["charged_micros"], charged, "{mine}");
    // The operator's view by account: a row per account that was charged, in one call.
    let (other, other_key) = n.funded("reporter-2", 10_000_000).await;
    assert_eq!(n.call("POST", "/v1/chat/completions", Some(chat(2)), &other_key).await.status, StatusCode::OK);
    let by_account = n.admin("GET", &format!("/admin/v1/usage?start_time={today}&group_by=account_id"), None).await;
    let rows: Vec<_> = by_account["data"][0]["results"].as_array().unwrap().iter().map(|r| (r["account_id"].clone(), r["num_model_requests"].clone())).collect();
    let mut want = vec![(json!(acc), json!(3)), (json!(other), json!(1))];
    want.sort_by_key(|w| w.0.as_str().unwrap().to_string());
    assert_eq!(rows, want, "{by_account}");
    let one = n.admin("GET", &format!("/admin/v1/usage?start_time={today}&group_by=account_id,model&account_id={acc}"), None).await;
    assert_eq!(one["data"][0]["results"], json!([mine["data"][0]["results"][0].as_object().unwrap().clone().into_iter()
        .map(|(k, v)| match k.as_str() { "account_id" => (k, json!(acc)), "model" => (k, json!(MODEL)), _ => (k, v) }).collect::<serde_json::Map<_, _>>()]), "{one}");
    // Some models only: another model's filter leaves the days empty.
    let of_model = n.call("GET", &format!("/v1/me/usage?start_time={today}&models={MODEL},other-model"), None, &key).await.json();
    assert_eq!(of_model, mine);
    // OpenAI's array form, a value per repeat.
    let repeated = n.call("GET", &format!("/v1/me/usage?start_time={today}&models[]={MODEL}&models[]=other-model"), None, &key).await.json();
    assert_eq!(repeated, mine);
    let of_none = n.call("GET", &format!("/v1/me/usage?start_time={today}&models=other-model"), None, &key).await.json();
    assert_eq!(of_none["data"][0]["results"], json!([]), "{of_none}");
    // Paging: one day per page.
    let first = n.call("GET", &format!("/v1/me/usage?start_time={yesterday}&limit=1"), None, &key).await.json();
    assert_eq!((&first["has_more"], &first["next_page"]), (&json!(true), &json!(today.to_string())), "{first}");
    let next = n.call("GET", &format!("/v1/me/usage?page={today}&limit=1"), None, &key).await.json();
    assert_eq!(next["data"], mine["data"]);
    // /v1/me: the same charges, all time.
    let me = n.call("GET", "/v1/me", None, &key).await.json();
    assert_eq!((&me["usage"]["requests"], &me["usage"]["charged_micros"], &me["usage"]["since"]), (&json!(3), &json!(charged), &json!(today)), "{me}");
    // Bad queries are the API's errors.
    for (uri, status, param) in [
        ("/v1/me/usage?bucket_width=1h".to_string(), StatusCode::BAD_REQUEST, "bucket_width"),
        (format!("/v1/me/usage?account_id={acc}"), StatusCode::BAD_REQUEST, "account_id"),
        ("/admin/v1/usage".to_string(), StatusCode::FORBIDDEN, ""),
        ("/v1/me/usage?group_by=project_id".to_string(), StatusCode::BAD_REQUEST, "group_by"),
        ("/v1/me/usage?project_ids=x".to_string(), StatusCode::BAD_REQUEST, "project_ids"),
        ("/v1/me/usage?limit=abc".to_string(), StatusCode::BAD_REQUEST, "limit"),
        ("/v1/me/usage?models=".to_string(), StatusCode::BAD_REQUEST, "models"),
        (format!("/v1/me/usage?start_time={}", now_s + 86_400), StatusCode::BAD_REQUEST, "start_time"),
    ] {
        let e = assert_error(&n.call("GET", &uri, None, &key).await, status);
        assert!(param.is_empty() || e["param"] == param, "{uri}: {e}");
    }
    for (id, status) in [("000000000000000000000000000000ff", StatusCode::NOT_FOUND), ("bob", StatusCode::BAD_REQUEST)] {
        let r = n.call("GET", &format!("/admin/v1/usage?account_id={id}"), None, &n.first.admin_key).await;
        assert_eq!(assert_error(&r, status)["param"], "account_id");
    }
}

#[tokio::test]
async fn a_statement_reads_newest_first_too() {
    let n = node(None, "unused", &[]).await;
    let (acc, key) = n.funded("pages", 10_000_000).await;
    for _ in 0..3 {
        assert_eq!(n.call("POST", "/v1/chat/completions", Some(chat(2)), &key).await.status, StatusCode::OK);
    }
    let oldest_first = n.statement(&acc).await;
    let (mut newest_first, mut before) = (Vec::new(), String::new());
    loop {
        let page = n.call("GET", &format!("/v1/me/transfers?order=desc&limit=2{before}"), None, &key).await.json();
        newest_first.extend(page["data"].as_array().unwrap().iter().cloned());
        assert!(page.get("next_after").is_none(), "{page}");
        match page["next_before"].as_u64() {
            Some(c) => before = format!("&before={c}"),
            None => break,
        }
    }
    assert_eq!(newest_first, oldest_first.into_iter().rev().collect::<Vec<_>>());
    for (query, param) in [("order=desc&after=1", "after"), ("before=5", "before"), ("order=sideways", "order")] {
        let e = assert_error(&n.call("GET", &format!("/v1/me/transfers?{query}"), None, &key).await, StatusCode::BAD_REQUEST);
        assert_eq!(e["param"], param, "{query}: {e}");
    }
}

#[tokio::test]
async fn token_ids_the_model_lacks_are_refused_before_anything_is_held() {
    let n = node(None, "unused", &[]).await;
    let (acc, key) = n.funded("vocab", 1_000_000).await;
    let cases = [
        ("/v1/completions", json!({"model": MODEL, "prompt": [1, 99_999_999], "max_tokens": 4}), "prompt"),
        ("/v1/completions", json!({"model": MODEL, "prompt": "Hi", "max_tokens": 4, "logit_bias": {"99999999": 1}}), "logit_bias"),
        ("/v1/chat/completions", json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "logit_bias": {"49152": 1}}), "logit_bias"),
        ("/v1/embeddings", json!({"model": MODEL, "input": [[5, 49_152]]}), "input"),
    ];
    for (uri, body, param) in cases {
        // The same key ten times: a request no credit could make valid does not spend its attempts.
        for _ in 0..10 {
            let auth = format!("Bearer {key}");
            let r = request(&n.state, "POST", uri, Some(&body.to_string()), &[("authorization", &auth), ("idempotency-key", "vocab-1")]).await;
            let e = assert_error(&r, StatusCode::BAD_REQUEST);
            assert_eq!((e["param"].as_str(), e["code"].as_str()), (Some(param), Some("invalid_value")), "{uri}: {e}");
            assert!(e["message"].as_str().unwrap().contains("outside the vocabulary"), "{e}");
        }
    }
    // So is a request for more generations than the model's queue takes at once.
    let many = json!({"model": MODEL, "prompt": vec!["Hi"; 8], "n": 16, "max_tokens": 1});
    for _ in 0..10 {
        let auth = format!("Bearer {key}");
        let r = request(&n.state, "POST", "/v1/completions", Some(&many.to_string()), &[("authorization", &auth), ("idempotency-key", "queue-1")]).await;
        let e = assert_error(&r, StatusCode::BAD_REQUEST);
        assert!(e["param"] == "n" && e["message"].as_str().unwrap().contains("queues at most"), "{e}");
    }
    assert_eq!(n.statement(&acc).await.len(), 1, "only the funding mint: no hold was placed");
    assert_eq!(n.balance(&acc).await, (1_000_000, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_request_with_the_same_idempotency_key_is_charged_once() {
    for pg in stores() {
        retry_once(node(pg.as_deref(), "tokenomy_api_idempotency", &[]).await).await;
    }
}

async fn retry_once(n: Node) {
    let (acc, key) = n.funded("retry", 1_000_000).await;
    let auth = format!("Bearer {key}");
    let h = [("authorization", auth.as_str()), ("idempotency-key", "order-42")];
    let body = chat(6).to_string();
    let a = request(&n.state, "POST", "/v1/chat/completions", Some(&body), &h).await;
    let b = request(&n.state, "POST", "/v1/chat/completions", Some(&body), &h).await;
    assert_eq!((a.status, b.status), (StatusCode::OK, StatusCode::OK), "{} {}", a.text, b.text);
    assert_eq!(a.text, b.text, "the retry returns the first result");
    assert_eq!(b.headers["idempotent-replayed"], "true");
    for name in ["x-request-id", "tokenomy-receipt"] {
        assert_eq!(a.headers[name], b.headers[name], "the replay carries the first answer's {name}");
    }
    let st = n.statement(&acc).await;
    assert_eq!(posted_usage(&st).len(), 1);
    let (bal, _) = n.balance(&acc).await;
    assert_eq!(1_000_000 - bal, a.json()["receipt"]["amount_micros"].as_i64().unwrap());
    // The same key with a different body is refused, not run.
    let other = request(&n.state, "POST", "/v1/chat/completions", Some(&chat(7).to_string()), &h).await;
    assert_eq!(assert_error(&other, StatusCode::CONFLICT)["code"], "idempotency_key_reused");
    // So is the same key and body sent to another API: never replayed in the first one's shape.
    let both = json!({"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "Name a color."}]}).to_string();
    let h = [("authorization", auth.as_str()), ("idempotency-key", "order-43")];
    assert_eq!(request(&n.state, "POST", "/v1/chat/completions", Some(&both), &h).await.status, StatusCode::OK);
    let elsewhere = request(&n.state, "POST", "/v1/messages", Some(&both), &h).await;
    assert_eq!(elsewhere.status, StatusCode::CONFLICT, "{}", elsewhere.text);
    assert!(!elsewhere.headers.contains_key("idempotent-replayed") && elsewhere.text.contains("another route"), "{}", elsewhere.text);
    // Another account's identical key is its own request.
    let (_, key2) = n.funded("retry2", 1_000_000).await;
    let auth2 = format!("Bearer {key2}");
    let c = request(&n.state, "POST", "/v1/chat/completions", Some(&body), &[("authorization", &auth2), ("idempotency-key", "order-42")]).await;
    assert!(!c.headers.contains_key("idempotent-replayed"));
    n.check().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_see_only_their_own_account_and_revocation_is_immediate() {
    for pg in stores() {
        isolation(node(pg.as_deref(), "tokenomy_api_isolation", &[]).await).await;
    }
}

async fn isolation(n: Node) {
    let (a_id, a_key) = n.funded("alice", 1_000_000).await;
    let (b_id, b_key) = n.funded("bob", 1_000_000).await;
    let r = n.call("POST", "/v1/chat/completions", Some(chat(2)), &b_key).await;
    let b_receipt = r.json()["receipt"]["id"].as_str().unwrap().to_string();
    // Alice cannot read Bob's receipt (404, not 403), his account, or mint or move his money.
    assert_error(&n.call("GET", &format!("/v1/receipts/{b_receipt}"), None, &a_key).await, StatusCode::NOT_FOUND);
    assert_eq!(n.call("GET", &format!("/v1/receipts/{b_receipt}"), None, &b_key).await.status, StatusCode::OK);
    assert_error(&n.call("GET", &format!("/admin/v1/accounts/{b_id}"), None, &a_key).await, StatusCode::FORBIDDEN);
    let steal = json!({"from": b_id, "to": a_id, "amount_micros": 1, "idempotency_key": "steal"});
    assert_error(&n.call("POST", "/admin/v1/transfers", Some(steal), &a_key).await, StatusCode::FORBIDDEN);
    let me = n.call("GET", "/v1/me", None, &a_key).await.json();
    assert_eq!(me["account"]["id"], a_id.as_str());
    assert_eq!(me["account"]["balance_micros"], 1_000_000);
    // Each key's statement is its own account's: Bob's shows his charge, Alice's her grant only.
    let bob = n.call("GET", "/v1/me/transfers", None, &b_key).await.json();
    let charged = r.json()["receipt"]["amount_micros"].clone();
    assert_eq!(posted_usage(bob["data"].as_array().unwrap()).iter().map(|t| t["amount_micros"].clone()).collect::<Vec<_>>(), [charged]);
    let alice = n.call("GET", "/v1/me/transfers", None, &a_key).await.json();
    let alice = alice["data"].as_array().unwrap();
    assert_eq!(alice.len(), 1, "{alice:?}");
    assert_eq!((alice[0]["to"].as_str(), alice[0]["code"].as_str()), (Some(a_id.as_str()), Some("mint")));
    // Revoked: 401 on the very next request.
    let keys = n.admin("GET", &format!("/admin/v1/accounts/{a_id}/keys"), None).await;
    let key_id = keys["data"][0]["key_id"].as_str().unwrap().to_string();
    n.admin("DELETE", &format!("/admin/v1/keys/{key_id}"), None).await;
    let e = assert_error(&n.call("POST", "/v1/chat/completions", Some(chat(2)), &a_key).await, StatusCode::UNAUTHORIZED);
    assert_eq!(e["code"], "invalid_api_key");
    assert_error(&n.call("GET", "/v1/me", None, &a_key).await, StatusCode::UNAUTHORIZED);
    // Its limits cannot be changed any more: it limits nothing.
    let r = n.call("PATCH", &format!("/admin/v1/keys/{key_id}/limits"), Some(json!({"rpm": 10})), &n.first.admin_key).await;
    assert!(assert_error(&r, StatusCode::CONFLICT)["message"].as_str().unwrap().contains("revoked"), "{}", r.text);
    // No key at all.
    let r = request(&n.state, "POST", "/v1/chat/completions", Some(&chat(2).to_string()), &[]).await;
    assert_error(&r, StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_a_valid_key_gets_401_whatever_its_body() {
    let n = node(None, "", &[]).await;
    let (_, user_key) = n.funded("u", 1_000).await;
    let before = n.check().await;
    let bodies = ["{not json", "{}", r#"{"model": 5}"#];
    let routes = [("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/admin/v1/accounts"), ("POST", "/admin/v1/transfers")];
    for (method, uri) in routes {
        for body in bodies {
            for auth in [vec![], vec![("authorization", "Bearer sk-wrong")]] {
                let r = request(&n.state, method, uri, Some(body), &auth).await;
                let e = assert_error(&r, StatusCode::UNAUTHORIZED);
                assert!(e["code"] == "invalid_api_key" || e["message"].as_str().unwrap().contains("Missing API key"), "{uri} {body}: {e}");
            }
        }
    }
    // Anthropic's routes answer in Anthropic's shape.
    for uri in ["/v1/messages", "/v1/messages/count_tokens"] {
        let r = request(&n.state, "POST", uri, Some("{}"), &[("x-api-key", "sk-wrong")]).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.text);
        assert_eq!(r.json()["error"]["type"], "authentication_error", "{}", r.text);
    }
    // With a valid key the body is judged as before; public routes and unknown paths need none.
    let r = n.call("POST", "/v1/chat/completions", None, &user_key).await;
    assert_error(&r, StatusCode::BAD_REQUEST);
    let r = request(&n.state, "POST", "/v1/chat/completions", Some("{not json"), &[("authorization", &format!("Bearer {user_key}"))]).await;
    assert_error(&r, StatusCode::BAD_REQUEST);
    assert_eq!(send(&n.state, "GET", "/health", None).await.status, StatusCode::OK);
    assert_eq!(send(&n.state, "GET", "/v1/log/checkpoint", None).await.status, StatusCode::OK);
    assert_error(&send(&n.state, "GET", "/v1/no-such-route", None).await, StatusCode::NOT_FOUND);
    // Two different keys in one request are no key; the same key twice is that key.
    let bearer = format!("Bearer {user_key}");
    let (_, other_key) = n.funded("second-key-holder", 0).await;
    for h in [vec![("authorization", bearer.as_str()), ("x-api-key", other_key.as_str())], vec![("authorization", bearer.as_str()), ("x-api-key", "tk-nonsense")]] {
        assert_error(&request(&n.state, "GET", "/v1/me", None, &h).await, StatusCode::UNAUTHORIZED);
    }
    let same = request(&n.state, "GET", "/v1/me", None, &[("authorization", &bearer), ("x-api-key", &user_key)]).await;
    assert_eq!(same.status, StatusCode::OK, "{}", same.text);
    let after = n.check().await;
    let count = |v: &Value, k: &str| v[k].as_u64().unwrap();
    assert_eq!((count(&before, "accounts") + 1, count(&before, "transfers")), (count(&after, "accounts"), count(&after, "transfers")), "only the key holder's account was made");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_auth_bills_keyless_requests_to_the_local_user_who_can_see_them() {
    let n = node(None, "", &[]).await;
    let state = n.state.clone().with_billing(n.state.billing.clone().unwrap(), true);
    let r = request(&state, "POST", "/v1/chat/completions", Some(&chat(2).to_string()), &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let receipt = r.json()["receipt"]["id"].as_str().unwrap().to_string();
    // Keyless: the local user's own view and receipts.
    let me = request(&state, "GET", "/v1/me", None, &[]).await;
    assert_eq!(me.status, StatusCode::OK, "{}", me.text);
    assert_eq!(me.json()["account"]["name"], "local");
    assert_eq!(me.json()["usage"]["requests"], 1);
    assert_eq!(request(&state, "GET", &format!("/v1/receipts/{receipt}"), None, &[]).await.status, StatusCode::OK);
    // A placeholder key (the SDKs insist on sending one) is no key: the local user's too.
    let placeholder = [("authorization", "Bearer sk-no-key-required")];
    assert_eq!(request(&state, "GET", "/v1/me", None, &placeholder).await.json()["account"]["name"], "local");
    // Never the admin API, and a wrong tokenomy key is still refused.
    assert_error(&request(&state, "GET", "/admin/v1/ledger/check", None, &[]).await, StatusCode::UNAUTHORIZED);
    assert_error(&request(&state, "GET", "/admin/v1/ledger/check", None, &placeholder).await, StatusCode::UNAUTHORIZED);
    assert_error(&request(&state, "GET", "/v1/me", None, &[("authorization", "Bearer tk-wrong")]).await, StatusCode::UNAUTHORIZED);
    // Another account's key sees its own account, not the local user's receipts.
    let (_, other) = n.funded("other", 1_000).await;
    let auth = format!("Bearer {other}");
    assert_eq!(request(&state, "GET", "/v1/me", None, &[("authorization", &auth)]).await.json()["account"]["name"], "other");
    assert_error(&request(&state, "GET", &format!("/v1/receipts/{receipt}"), None, &[("authorization", &auth)]).await, StatusCode::NOT_FOUND);
    n.check().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_admin_input_is_refused_and_changes_nothing() {
    for pg in stores() {
        let n = node(pg.as_deref(), "tokenomy_api_bad_input", &[]).await;
        let (a, a_key) = n.funded("a", 1_000).await;
        let (b, _) = n.funded("b", 1_000).await;
        let before = n.check().await;
        let admin = n.first.admin_key.clone();
        let key_id = n.call("GET", &format!("/admin/v1/accounts/{a}/keys"), None, &admin).await.json()["data"][0]["key_id"].as_str().unwrap().to_string();
        let cases: Vec<(&str, String, Value, &str, StatusCode)> = vec![
            ("POST", format!("/admin/v1/accounts/{a}/mint"), json!({"amount_micros": -5, "idempotency_key": "n"}), &admin, StatusCode::BAD_REQUEST),
            ("POST", format!("/admin/v1/accounts/{a}/mint"), json!({"amount_micros": 0, "idempotency_key": "z"}), &admin, StatusCode::BAD_REQUEST),
            ("POST", format!("/admin/v1/accounts/{a}/mint"), json!({"amount_micros": 1e30, "idempotency_key": "o"}), &admin, StatusCode::BAD_REQUEST),
            ("POST", format!("/admin/v1/accounts/{a}/mint"), json!({"amount_micros": i64::MAX, "idempotency_key": "m"}), &admin, StatusCode::BAD_REQUEST),
            ("POST", "/admin/v1/accounts/00000000000000000000000000000abc/mint".into(), json!({"amount_micros": 5, "idempotency_key": "u"}), &admin, StatusCode::NOT_FOUND),
            ("POST", "/admin/v1/accounts/not-an-id/mint".into(), json!({"amount_micros": 5, "idempotency_key": "x"}), &admin, StatusCode::BAD_REQUEST),
            ("POST", "/admin/v1/transfers".into(), json!({"from": a, "to": a, "amount_micros": 5, "idempotency_key": "s"}), &admin, StatusCode::BAD_REQUEST),
            ("POST", "/admin/v1/transfers".into(), json!({"from": a, "to": b, "amount_micros": 5_000, "idempotency_key": "t"}), &admin, StatusCode::PAYMENT_REQUIRED),
            ("POST", format!("/admin/v1/accounts/{a}/mint"), json!({"amount_micros": 5, "idempotency_key": "k"}), &a_key, StatusCode::FORBIDDEN),
            ("POST", format!("/admin/v1/accounts/{a}/mint"), json!({"amount_micros": 5, "idempotency_key": "k"}), "", StatusCode::UNAUTHORIZED),
            ("POST", "/admin/v1/accounts".into(), json!({"name": "x", "kind": "treasury"}), &admin, StatusCode::BAD_REQUEST),
            ("POST", format!("/admin/v1/accounts/{a}/keys"), json!({"scopes": ["root"]}), &admin, StatusCode::BAD_REQUEST),
            // an admin key on a customer's account would let the customer mint to themselves
            ("POST", format!("/admin/v1/accounts/{a}/keys"), json!({"scopes": ["admin"]}), &admin, StatusCode::BAD_REQUEST),
            ("POST", "/admin/v1/accounts".into(), json!({"name": "a", "kind": "user"}), &admin, StatusCode::CONFLICT),
            ("POST", "/admin/v1/accounts".into(), json!({"name": "x\nbalance_micros: 9", "kind": "user"}), &admin, StatusCode::BAD_REQUEST),
            ("PATCH", "/admin/v1/keys/00000000000000000000000000000abc/limits".into(), json!({"rpm": 5}), &admin, StatusCode::NOT_FOUND),
            ("PATCH", format!("/admin/v1/keys/{key_id}/limits"), json!({"rpm": 0}), &admin, StatusCode::BAD_REQUEST),
            ("PATCH", format!("/admin/v1/keys/{key_id}/limits"), json!({"budget": 5}), &admin, StatusCode::BAD_REQUEST),
            ("PATCH", format!("/admin/v1/keys/{key_id}/limits"), json!({"rpm": 5}), &a_key, StatusCode::FORBIDDEN),
        ];
        for (method, uri, body, key, status) in cases {
            let r = n.call(method, &uri, Some(body.clone()), key).await;
            let e = assert_error(&r, status);
            assert!(!e["message"].as_str().unwrap().is_empty(), "{uri} {body}");
        }
        let after = n.check().await;
        assert_eq!((before["accounts"].clone(), before["transfers"].clone()), (after["accounts"].clone(), after["transfers"].clone()));
        assert_eq!(n.balance(&a).await, (1_000, 0));
        // An operator's idempotency key cannot take the form of the node's own ledger keys
        // (it would be answered with a customer's transfer or a request's hold).
        for key in [format!("send:{a}:zz"), "late:01".into(), "idem:x".into()] {
            let r = n.call("POST", &format!("/admin/v1/accounts/{a}/mint"), Some(json!({"amount_micros": 5, "idempotency_key": key})), &admin).await;
            assert_eq!(assert_error(&r, StatusCode::BAD_REQUEST)["param"], "idempotency_key", "{key}");
        }
        // A page that holds exactly the rest of the accounts says there is no next one.
        let all = n.admin("GET", "/admin/v1/accounts?limit=1000", None).await["data"].as_array().unwrap().len();
        let exact = n.admin("GET", &format!("/admin/v1/accounts?limit={all}"), None).await;
        assert_eq!((exact["has_more"].as_bool(), exact["next_after"].is_null()), (Some(false), true), "{exact}");
        let short = n.admin("GET", &format!("/admin/v1/accounts?limit={}", all - 1), None).await;
        assert_eq!(short["has_more"], true);
        // A scope named twice is one scope.
        let k = n.admin("POST", &format!("/admin/v1/accounts/{a}/keys"), Some(json!({"scopes": ["inference", "inference"]}))).await;
        assert_eq!(k["scopes"], json!(["inference"]), "{k}");
        // An account is found by its name.
        let named = n.admin("GET", "/admin/v1/accounts?name=a", None).await;
        assert_eq!((named["data"].as_array().unwrap().len(), named["data"][0]["id"].as_str()), (1, Some(a.as_str())), "{named}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_and_insufficient_quota_speak_openai() {
    let n = node(None, "", &[]).await;
    let (acc, _) = n.funded("limited", 10_000_000).await;
    let k = n.admin("POST", &format!("/admin/v1/accounts/{acc}/keys"), Some(json!({"scopes": ["inference"], "rpm": 2}))).await;
    let key = k["key"].as_str().unwrap();
    let first = n.call("POST", "/v1/chat/completions", Some(chat(1)), key).await;
    assert_eq!(first.headers["x-ratelimit-limit-requests"], "2");
    assert_eq!(first.headers["x-ratelimit-remaining-requests"], "1");
    n.call("POST", "/v1/chat/completions", Some(chat(1)), key).await;
    let r = n.call("POST", "/v1/chat/completions", Some(chat(1)), key).await;
    let e = assert_error(&r, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("requests"), Some("rate_limit_exceeded")), "{e}");
    assert!(r.headers["retry-after"].to_str().unwrap().parse::<u32>().unwrap() >= 1);
    assert_eq!((&r.headers["x-ratelimit-limit-requests"], &r.headers["x-ratelimit-remaining-requests"]), (&"2".parse().unwrap(), &"0".parse().unwrap()));
    assert!(r.headers.contains_key("x-request-id"), "an error names a request id too");
    // `/v1/me` says what is left, and asking uses none of it.
    for _ in 0..2 {
        let me = n.call("GET", "/v1/me", None, key).await.json();
        assert_eq!((me["rate"]["remaining_requests"].as_u64(), me["rate"]["remaining_tokens"].as_u64()), (Some(0), None), "{me}");
        assert!((1..=60_000).contains(&me["rate"]["reset_requests_ms"].as_i64().unwrap()), "{me}");
    }

    // TPM: requests sent at once reserve their prompt + max_tokens when placed, so a burst
    // overshoots the minute's tokens by at most one request (they used to all run).
    let k = n.admin("POST", &format!("/admin/v1/accounts/{acc}/keys"), Some(json!({"scopes": ["inference"], "tpm": 100}))).await;
    let replies = concurrent_chats(&n, k["key"].as_str().unwrap(), 8).await;
    let ok: Vec<&Reply> = replies.iter().filter(|r| r.status == StatusCode::OK).collect();
    let used: u64 = ok.iter().map(|r| r.json()["usage"]["total_tokens"].as_u64().unwrap()).sum();
    let each = used / ok.len() as u64; // the requests are alike
    assert!(ok.len() < 8 && used - each < 100, "{} of 8 ran, {used} tokens: all but the last fit the minute", ok.len());
    for r in replies.iter().filter(|r| r.status != StatusCode::OK) {
        let e = assert_error(r, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("tokens"), Some("rate_limit_exceeded")), "OpenAI's type names the limit: {e}");
        assert_eq!(r.headers["x-ratelimit-limit-tokens"], "100");
    }
    // A request that may use more than the minute's tokens is refused at once, whatever is
    // left (OpenAI's "Request too large"): no Retry-After, as waiting does not help. Without
    // max_tokens, the answer may use what the limit leaves after its prompt, and ends there.
    let k = n.admin("POST", &format!("/admin/v1/accounts/{acc}/keys"), Some(json!({"scopes": ["inference"], "tpm": 60}))).await;
    let key = k["key"].as_str().unwrap();
    let r = n.call("POST", "/v1/chat/completions", Some(chat(200)), key).await;
    let e = assert_error(&r, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("tokens"), Some("rate_limit_exceeded")), "{e}");
    assert!(!r.headers.contains_key("retry-after"), "{:?}", r.headers);
    assert_eq!(r.headers["x-ratelimit-limit-tokens"], "60", "the refusal says where the key's limits stand");
    let mut open_ended = chat(1);
    open_ended.as_object_mut().unwrap().remove("max_tokens");
    open_ended["ignore_eos"] = json!(true);
    let r = n.call("POST", "/v1/chat/completions", Some(open_ended), key).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let v = r.json();
    assert_eq!((v["usage"]["total_tokens"].as_u64(), v["choices"][0]["finish_reason"].as_str()), (Some(60), Some("length")), "{v}");
    // The token headers say what is left after this request (as OpenAI's do), not before it.
    // Its tokens count from when it was placed, so the minute has moved on by its duration
    // (60 ms a token at 1 000 a minute) when it ends.
    let k = n.admin("POST", &format!("/admin/v1/accounts/{acc}/keys"), Some(json!({"scopes": ["inference"], "tpm": 1000}))).await;
    let t0 = std::time::Instant::now();
    let r = n.call("POST", "/v1/chat/completions", Some(chat(4)), k["key"].as_str().unwrap()).await;
    let leaked = t0.elapsed().as_millis() as u64 / 60 + 1;
    let used = r.json()["usage"]["total_tokens"].as_u64().unwrap();
    let left: u64 = r.headers["x-ratelimit-remaining-tokens"].to_str().unwrap().parse().unwrap();
    assert!(left <= 1000 - used + leaked && left + 2 >= 1000 - used, "{left} tokens left after using {used} of 1000 in {leaked} tokens' time");

    // An unfunded account: 402 before any generation, nothing held.
    let (poor, poor_key) = n.funded("poor", 0).await;
    let r = n.call("POST", "/v1/chat/completions", Some(chat(8)), &poor_key).await;
    let e = assert_error(&r, StatusCode::PAYMENT_REQUIRED);
    assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("insufficient_quota"), Some("insufficient_quota")));
    assert_eq!(n.balance(&poor).await, (0, 0));
    // A request no credit could buy (beyond the context) is a 400 whatever the balance.
    let mut huge = chat(8);
    huge["max_tokens"] = json!(1_000_000_000);
    let r = n.call("POST", "/v1/chat/completions", Some(huge), &poor_key).await;
    assert_eq!(assert_error(&r, StatusCode::BAD_REQUEST)["code"], "context_length_exceeded");
    // Receipt ids are unique across requests.
    let ids: HashSet<String> = futures::future::join_all((0..3).map(|_| n.call("POST", "/v1/completions", Some(json!({"model": MODEL, "prompt": "Hi", "max_tokens": 2})), &n.first.user_key)))
        .await
        .iter()
        .map(|r| r.json()["receipt"]["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 3);
}

/// A key's daily spend cap holds under concurrency (in-flight requests count against it),
/// on both stores; `/v1/me` and the admin key list report the spend; bad caps are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_spend_cap_bounds_concurrent_requests() {
    for pg in stores() {
        let n = node(pg.as_deref(), "tokenomy_api_spend_cap", &[]).await;
        let probe = n.call("POST", "/v1/chat/completions", Some(chat(1)), &n.first.user_key).await.json();
        let prompt = probe["usage"]["prompt_tokens"].as_i64().unwrap();
        let worst = (prompt * 50_000 + 8 * 200_000).div_euclid(1_000_000) + 1;
        let (acc, _) = n.funded("agent-owner", 1_000 * worst).await;
        let cap = 5 * worst;
        let k = n
            .admin("POST", &format!("/admin/v1/accounts/{acc}/keys"), Some(json!({"scopes": ["inference"], "spend_cap_day_micros": cap})))
            .await;
        assert_eq!(k["spend_cap_day_micros"], cap);
        let key = k["key"].as_str().unwrap().to_string();
        let mut ok = 0;
        for r in concurrent_chats(&n, &key, 30).await {
            match r.status {
                StatusCode::OK => ok += 1,
                StatusCode::PAYMENT_REQUIRED => {
                    let e = assert_error(&r, StatusCode::PAYMENT_REQUIRED);
                    assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("insufficient_quota"), Some("spend_cap_exceeded")));
                    assert!(e["message"].as_str().unwrap().contains("daily spend cap"), "{e}");
                }
                s => panic!("an answer or a 402, got {s}: {}", r.text),
            }
        }
        assert!(ok >= 5, "at least the cap's worth of worst cases is served: {ok}");
        let st = n.statement(&acc).await;
        let charged: i64 = posted_usage(&st).iter().map(|t| t["amount_micros"].as_i64().unwrap()).sum();
        assert!(charged <= cap, "charged {charged} > cap {cap}");
        assert_eq!(posted_usage(&st).len(), ok);
        let me = n.call("GET", "/v1/me", None, &key).await.json();
        assert_eq!(me["limits"]["spend_cap_day_micros"], cap);
        assert_eq!((me["spend"]["day_micros"].as_i64(), me["spend"]["pending_micros"].as_i64()), (Some(charged), Some(0)));
        assert_eq!(me["spend"]["day_remaining_micros"].as_i64(), Some(cap - charged));
        let listed = n.admin("GET", &format!("/admin/v1/accounts/{acc}/keys"), None).await;
        let row = listed["data"].as_array().unwrap().iter().find(|r| r["key_id"] == k["key_id"]).unwrap().clone();
        assert_eq!(row["spend"]["day_micros"].as_i64(), Some(charged));
        // Uncapped keys report no spend counters; a negative cap is refused.
        assert!(n.call("GET", "/v1/me", None, &n.first.user_key).await.json()["spend"].is_null());
        let bad = n.call("POST", &format!("/admin/v1/accounts/{acc}/keys"), Some(json!({"spend_cap_month_micros": -5})), &n.first.admin_key).await;
        assert!(assert_error(&bad, StatusCode::BAD_REQUEST)["message"].as_str().unwrap().contains("spend cap"));
        n.check().await;
    }
}

/// A ledger that goes away while an answer streams: the answer ends, and its last chunk names
/// its receipt as pending (the settlement is retried in the background, under that id, the one
/// the `Tokenomy-Receipt` header named) instead of naming none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_whose_settlement_is_retried_names_its_receipt_as_pending() {
    use http_body_util::BodyExt;
    let Ok(server) = std::env::var("TOKENOMY_TEST_POSTGRES_URL") else {
        return eprintln!("SKIP PostgreSQL: TOKENOMY_TEST_POSTGRES_URL is not set");
    };
    let db = "tokenomy_api_pending_receipt";
    let n = node(Some(&server), db, &[]).await;
    // Long enough that the ledger is away before it ends, on a loaded machine too (it once
    // ended, 24 tokens long, before the database had gone).
    let body = json!({"model": MODEL, "max_tokens": 192, "ignore_eos": true, "stream": true,
        "messages": [{"role": "user", "content": "Count to ten."}]});
    let req = axum::http::Request::builder()
        .method("POST")
        .uri("/v1/chat/completions")
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {}", n.first.user_key))
        .body(axum::body::Body::from(body.to_string()))
        .unwrap();
    let resp = tower::ServiceExt::oneshot(tokenomy_api::app(n.state.clone()), req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let named = resp.headers()["tokenomy-receipt"].to_str().unwrap().to_string();
    // The hold is placed (the head is sent after it): now the ledger goes away.
    // Away until the answer has ended (then brought back at once).
    let back = tokenomy_ledger::testing::database_away(&server, db, std::time::Duration::from_secs(120)).await;
    let text = String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    back.abort();
    tokenomy_ledger::testing::database_back(&server, db).await;
    let last: Value = text.lines().filter_map(|l| l.strip_prefix("data: ")).filter(|d| *d != "[DONE]").last().map(|d| serde_json::from_str(d).unwrap()).unwrap();
    assert_eq!((last["receipt"]["id"].as_str(), last["receipt"]["status"].as_str()), (Some(named.as_str()), Some("pending")), "{last}");
}

/// A schema that the constrained decoder can start but not finish (an `anyOf` past
/// llguidance's row limit, reached after a first property) fails midway: what was generated
/// until then is charged, streamed or not, and the answer is a 400 naming the schema (it used
/// to stream its tokens and then void the hold: tokens for free).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_that_fails_midway_is_charged_for_what_it_generated() {
    let n = node(None, "tokenomy_api_schema_midway", &[]).await;
    let (acc, key) = n.funded("schemer", 1_000_000).await;
    let branches: Vec<Value> = (0..2001).map(|i| json!({"type": "object", "properties": {format!("k{i}"): {"type": "integer"}}, "required": [format!("k{i}")]})).collect();
    let schema = json!({"type": "object", "properties": {"s": {"type": "string", "minLength": 5, "maxLength": 12}, "a": {"anyOf": branches}}, "required": ["s", "a"]});
    for stream in [false, true] {
        let (before, _) = n.balance(&acc).await;
        let body = json!({"model": MODEL, "max_tokens": 60, "temperature": 0, "stream": stream,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
            "messages": [{"role": "user", "content": "Answer in JSON."}]});
        let r = n.call("POST", "/v1/chat/completions", Some(body), &key).await;
        if stream {
            assert!(r.text.contains("could not be followed"), "{}", r.text);
        } else {
            let e = assert_error(&r, StatusCode::BAD_REQUEST);
            assert!(e["message"].as_str().unwrap().contains("could not be followed") && e["message"].as_str().unwrap().len() < 600, "{e}");
        }
        let (after, pending) = n.balance(&acc).await;
        assert!(after < before && pending == 0, "charged for what it generated: {before} → {after}");
    }
    n.check().await;
}

/// Each account has its own prefix cache: another account's identical prompt reads nothing
/// from it (`cached_tokens` would tell it what that account had sent), while the account's
/// own repeat does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accounts_prompts_are_cached_for_it_alone() {
    let mut n = node(None, "tokenomy_api_cache_salt", &[]).await;
    // An engine of its own: tests running at once on the shared one may take alice's slot.
    n.state.backend = Arc::new(engine_with(|_| {}));
    let (_, alice) = n.funded("salt-alice", 1_000_000).await;
    let (_, mallory) = n.funded("salt-mallory", 1_000_000).await;
    let body = json!({"model": MODEL, "max_tokens": 1, "temperature": 0, "messages": [
        {"role": "system", "content": "Customer note 7731: PIN 8841, account overdrawn since March, be discreet about it."},
        {"role": "user", "content": "Summarise the note."}]});
    let cached = |r: Reply| r.json()["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap();
    assert_eq!(cached(n.call("POST", "/v1/chat/completions", Some(body.clone()), &alice).await), 0);
    assert_eq!(cached(n.call("POST", "/v1/chat/completions", Some(body.clone()), &mallory).await), 0, "another account's prompt is not read");
    assert!(cached(n.call("POST", "/v1/chat/completions", Some(body.clone()), &alice).await) > 20, "the account's own repeat is");
}

/// Two nodes of one PostgreSQL ledger behind a load balancer: a receipt one issued is served
/// by the other, verifiable with the issuing node's key, which `/v1/node/keys` of either node
/// lists (the upkeep publishes each node's signatures and checkpoints to the ledger).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receipt_is_served_by_every_node_of_a_postgres_ledger() {
    let Ok(server) = std::env::var("TOKENOMY_TEST_POSTGRES_URL") else {
        return eprintln!("SKIP PostgreSQL: TOKENOMY_TEST_POSTGRES_URL is not set");
    };
    let url = fresh_pg(&server, "tokenomy_api_receipts_any_node").await;
    let env = vec![("TOKENOMY_BILLING__CHECKPOINT_INTERVAL_MS".to_string(), "200".to_string())];
    let open = |origin: &str| {
        let dir = tempfile::tempdir().unwrap();
        let opts = OpenOptions { data_dir: dir.path().into(), database_url: Some(url.clone()), origin: Some(origin.into()), env: env.clone() };
        async move { (Billing::open(opts).await.unwrap(), dir) }
    };
    let ((billing_a, first), _dir_a) = open("test.tokenomy/a").await;
    let ((billing_b, _), _dir_b) = open("test.tokenomy/b").await;
    let _upkeep = billing_a.spawn_upkeep();
    let key_a = billing_a.verifier();
    let a = AppState::new(shared_engine(), Default::default()).with_billing(billing_a, false);
    let b = AppState::new(shared_engine(), Default::default()).with_billing(billing_b.clone(), false);
    let key = first.unwrap().user_key;
    let auth = [("authorization", format!("Bearer {key}"))];
    let auth: Vec<(&str, &str)> = auth.iter().map(|(k, v)| (*k, v.as_str())).collect();

    let r = request(&a, "POST", "/v1/chat/completions", Some(&chat(4).to_string()), &auth).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let id = r.json()["receipt"]["id"].as_str().unwrap().to_string();
    let from_b = request(&b, "GET", &format!("/v1/receipts/{id}"), None, &auth).await;
    assert_eq!(from_b.status, StatusCode::OK, "{}", from_b.text);
    assert_eq!(verify_bundle(&from_b.text, &key_a).unwrap().receipt.receipt_id, id);
    assert!(verify_bundle(&from_b.text, &billing_b.verifier()).is_err());
    let keys = request(&b, "GET", "/v1/node/keys", None, &[]).await;
    assert_eq!(keys.status, StatusCode::OK);
    let listed: Vec<&str> = keys.text.lines().collect();
    assert_eq!(listed, [billing_b.verifier().to_string(), key_a.to_string()], "{}", keys.text);
    // A receipt no node issued is "not found" there too.
    let other = request(&b, "GET", "/v1/receipts/rcpt_00000000000000000000000000000000", None, &auth).await;
    assert_error(&other, StatusCode::NOT_FOUND);
}
