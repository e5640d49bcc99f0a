//! `kill -9` of a node at random moments during streaming requests, then restart, on SQLite and
//! (when `TOKENOMY_TEST_POSTGRES_URL` is set) PostgreSQL. Afterwards: no hold left pending past
//! its timeout, the ledger checks out, no request is charged twice, every completed response has
//! exactly one posted charge whose receipt verifies offline with the CLI, the log holds exactly
//! one receipt per posting and none for a voided hold (`ledger/check`: every log entry names a
//! posted transfer, each at most once; the log's size equals the postings), and every checkpoint published before a crash is consistent with
//! the one after (checked with `tokenomy verify-log`).

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::{model, run, serve_in, tempdir, Node, SMOLLM2};

const REQUESTS: usize = 50;
const ROUNDS: usize = 4;
// Short, so the holds of killed nodes expire quickly; answers still in progress keep theirs
// alive (the node extends them), however loaded the machine.
const HOLD_TIMEOUT_MS: u64 = 4_000;

use tokenomy_ledger::testing::stores;

fn fresh_pg(url: &str, name: &str) -> String {
    tokio::runtime::Runtime::new().unwrap().block_on(tokenomy_ledger::testing::fresh_database(url, name))
}

/// One streaming request: the receipt id from the header, and whether the stream completed.
struct Outcome {
    receipt_id: Option<String>,
    completed: bool,
    last_receipt: Option<String>,
}

fn stream(base: &str, key: &str, i: usize) -> Outcome {
    let body = json!({"model": "smollm2", "stream": true, "max_tokens": 24, "temperature": 0.7, "seed": i,
        "messages": [{"role": "user", "content": format!("Write a short line about the number {i}.")}]});
    let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(120)).build().unwrap();
    let Ok(r) = client.post(format!("{base}/v1/chat/completions")).bearer_auth(key).json(&body).send() else {
        return Outcome { receipt_id: None, completed: false, last_receipt: None };
    };
    let receipt_id = r.headers().get("tokenomy-receipt").map(|v| v.to_str().unwrap().to_string());
    let text = r.text().unwrap_or_default();
    let data: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    let completed = data.last() == Some(&"[DONE]");
    let last_receipt = completed
        .then(|| serde_json::from_str::<Value>(data[data.len() - 2]).ok())
        .flatten()
        .and_then(|v| v["receipt"]["id"].as_str().map(str::to_string));
    Outcome { receipt_id, completed, last_receipt }
}

fn get(base: &str, path: &str, key: &str) -> (u16, String) {
    let r = reqwest::blocking::Client::new().get(format!("{base}{path}")).bearer_auth(key).send().unwrap();
    (r.status().as_u16(), r.text().unwrap())
}

fn admin(node: &Node, path: &str) -> Value {
    let (s, t) = get(&node.base, path, &node.admin_key());
    assert_eq!(s, 200, "{path}: {t}");
    serde_json::from_str(&t).unwrap()
}

/// A small deterministic PRNG (xorshift), so a failing run can be replayed.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn start(dir: &Path, database: Option<&str>) -> Node {
    let m = model(SMOLLM2);
    let mut args = vec!["--model", m.to_str().unwrap()];
    if let Some(d) = database {
        args.extend(["--database", d]);
    }
    let timeout = HOLD_TIMEOUT_MS.to_string();
    serve_in(dir, &args, &[("TOKENOMY_BILLING__HOLD_TIMEOUT_MS", &timeout), ("TOKENOMY_BILLING__EXPIRE_INTERVAL_MS", "500"), ("TOKENOMY_BILLING__CHECKPOINT_INTERVAL_MS", "250")])
}

#[test]
fn kill_9_during_streams_loses_and_doubles_nothing() {
    for pg in stores() {
        let dir = tempdir("crash");
        let database = pg.map(|u| fresh_pg(&u, "tokenomy_crash_it"));
        let mut seed = 0x9E37_79B9_7F4A_7C15_u64;
        let mut outcomes = Vec::new();
        let mut checkpoints: Vec<String> = Vec::new();
        let mut node = start(&dir, database.as_deref());
        let key = node.user_key();
        let completed = Arc::new(AtomicUsize::new(0));
        for round in 0..ROUNDS {
            let n = REQUESTS / ROUNDS + usize::from(round < REQUESTS % ROUNDS);
            let base = node.base.clone();
            let handles: Vec<_> = (0..n)
                .map(|j| {
                    let (base, key, completed) = (base.clone(), key.clone(), completed.clone());
                    std::thread::spawn(move || {
                        let o = stream(&base, &key, round * 100 + j);
                        completed.fetch_add(usize::from(o.completed), Ordering::SeqCst);
                        o
                    })
                })
                .collect();
            // Publish a checkpoint mid-load, then kill at a random moment.
            std::thread::sleep(Duration::from_millis(200 + next(&mut seed) % 600));
            checkpoints.push(get(&node.base, "/v1/log/checkpoint", "").1);
            std::thread::sleep(Duration::from_millis(500 + next(&mut seed) % 2_500));
            // On a loaded machine every kill may come before any answer ends: the last one
            // waits for one, so the "completed answers are charged once" half is never vacuous.
            let waited = Instant::now();
            while round == ROUNDS - 1 && completed.load(Ordering::SeqCst) == 0 && waited.elapsed() < Duration::from_secs(120) {
                std::thread::sleep(Duration::from_millis(20));
            }
            node.kill();
            outcomes.extend(handles.into_iter().map(|h| h.join().unwrap()));
            node = start(&dir, database.as_deref());
        }
        assert_eq!(outcomes.len(), REQUESTS);
        // Let every hold placed before the last crash pass its timeout and be swept.
        std::thread::sleep(Duration::from_millis(HOLD_TIMEOUT_MS + 1_500));

        let me = serde_json::from_str::<Value>(&get(&node.base, "/v1/me", &key).1).unwrap();
        let account = me["account"]["id"].as_str().unwrap().to_string();
        assert_eq!(me["account"]["pending_micros"], 0, "a hold was left pending past its timeout: {me}");
        let check = admin(&node, "/admin/v1/ledger/check");
        assert_eq!((check["ok"].clone(), check["sum_micros"].clone()), (json!(true), json!(0)), "{check}");

        let st = admin(&node, &format!("/admin/v1/accounts/{account}/transfers?limit=1000"));
        let posted: Vec<&Value> = st["data"].as_array().unwrap().iter().filter(|t| t["state"] == "posted" && t["is_hold"] == false).collect();
        let usage: Vec<&Value> = posted.iter().copied().filter(|t| t["code"] == "usagecharge").collect();
        let holds: HashSet<&str> = usage.iter().map(|t| t["pending_id"].as_str().unwrap()).collect();
        assert_eq!(holds.len(), usage.len(), "a hold was posted twice");
        let transfers: HashSet<&str> = usage.iter().map(|t| t["id"].as_str().unwrap()).collect();

        // Every completed response: one receipt, verified offline, for one posted charge.
        let key_file = dir.join("node.pub");
        let completed: Vec<&Outcome> = outcomes.iter().filter(|o| o.completed).collect();
        assert!(!completed.is_empty(), "no stream completed: the kills came too early");
        let mut seen = HashSet::new();
        for o in &completed {
            let id = o.receipt_id.clone().expect("a billed stream names its receipt");
            assert_eq!(o.last_receipt.as_deref(), Some(id.as_str()), "the final chunk carries the receipt");
            let (status, bundle) = get(&node.base, &format!("/v1/receipts/{id}"), &key);
            assert_eq!(status, 200, "{bundle}");
            let file = dir.join(format!("{id}.json"));
            std::fs::write(&file, &bundle).unwrap();
            let (ok, out) = run(&["verify", file.to_str().unwrap(), "--key", key_file.to_str().unwrap()], &[]);
            assert!(ok, "{out}");
            let transfer = serde_json::from_str::<Value>(&bundle).unwrap()["receipt"]["transfer_id"].as_str().unwrap().to_string();
            assert!(transfers.contains(transfer.as_str()), "receipt {id} names transfer {transfer}, which is not a posted charge");
            assert!(seen.insert(transfer), "two responses share one charge");
        }

        // The log holds exactly one receipt per posting (usage charges + the first-run grant).
        let final_cp = get(&node.base, "/v1/log/checkpoint", "").1;
        let size = |note: &str| note.lines().nth(1).unwrap().parse::<u64>().unwrap();
        assert_eq!(size(&final_cp), posted.len() as u64, "log entries vs posted transfers");

        // Every checkpoint published before a crash is consistent with the one after.
        let new_file = dir.join("cp-final");
        std::fs::write(&new_file, &final_cp).unwrap();
        for (i, old) in checkpoints.iter().enumerate().filter(|(_, c)| size(c) > 0) {
            let (status, proof) = get(&node.base, &format!("/v1/log/consistency?old={}&new={}", size(old), size(&final_cp)), "");
            assert_eq!(status, 200, "{proof}");
            let (old_file, proof_file) = (dir.join(format!("cp-{i}")), dir.join(format!("proof-{i}")));
            std::fs::write(&old_file, old).unwrap();
            std::fs::write(&proof_file, &proof).unwrap();
            let args = ["verify-log", "--key", key_file.to_str().unwrap(), old_file.to_str().unwrap(), new_file.to_str().unwrap(), proof_file.to_str().unwrap()];
            let (ok, out) = run(&args, &[]);
            assert!(ok, "{out}");
            // A proof relabelled for other sizes is refused, though its hashes fit.
            let mut relabelled: serde_json::Value = serde_json::from_str(&proof).unwrap();
            relabelled["old"] = (size(old) + 1).into();
            std::fs::write(&proof_file, relabelled.to_string()).unwrap();
            let (ok, out) = run(&args, &[]);
            assert!(!ok && out.contains("the proof says it is from size"), "{out}");
        }
        eprintln!(
            "crash test ({}): {} requests, {} completed, {} charges posted, log size {}",
            if database.is_some() { "postgres" } else { "sqlite" },
            outcomes.len(),
            completed.len(),
            usage.len(),
            size(&final_cp)
        );
        node.kill();
    }
}
