//! The admin CLI wrappers (`tokenomy accounts|keys|credits|ledger … --json`) against a running
//! node: an agent account gets credits and a key with a daily spend cap, the cap refuses a
//! request it cannot cover with the API's 402, raising it lets the next request through, and
//! bad input is an error that names the problem.

use serde_json::{json, Value};

use crate::{model, run, serve, SMOLLM2};

#[test]
fn the_admin_cli_wraps_the_admin_api() {
    let m = model(SMOLLM2);
    let node = serve(&["--model", m.to_str().unwrap()]);
    let dir = node.dir.to_str().unwrap().to_string();
    let cli = |args: &[&str]| -> Value {
        let mut all = args.to_vec();
        all.extend(["--url", &node.base, "--data-dir", &dir, "--json"]);
        let (ok, out) = run(&all, &[]);
        assert!(ok, "tokenomy {args:?}: {out}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?} printed no JSON ({e}): {out}"))
    };
    let acc = cli(&["accounts", "create", "agent-7", "--kind", "agent"]);
    let id = acc["id"].as_str().unwrap().to_string();
    let minted = cli(&["credits", "mint", &id, "5000000", "--idempotency-key", "cli-fund-7"]);
    assert_eq!(minted["transfer"]["amount_micros"], 5_000_000);
    let k = cli(&["keys", "create", &id, "--spend-cap-day-micros", "1", "--spend-cap-month-micros", "100"]);
    assert_eq!((k["spend_cap_day_micros"].as_i64(), k["spend_cap_month_micros"].as_i64()), (Some(1), Some(100)));
    let key = k["key"].as_str().unwrap();

    let body = json!({"model": "smollm2", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]});
    let r = reqwest::blocking::Client::new().post(format!("{}/v1/chat/completions", node.base)).bearer_auth(key).json(&body).send().unwrap();
    assert_eq!(r.status().as_u16(), 402);
    let e: Value = r.json().unwrap();
    assert_eq!(e["error"]["code"], "spend_cap_exceeded", "{e}");

    // A lost account id is found again by name.
    let listed = cli(&["accounts", "list", "--name", "agent-7"]);
    assert_eq!(listed["data"].as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed["data"][0]["id"], id.as_str());
    let all = cli(&["accounts", "list"]);
    assert!(all["data"].as_array().unwrap().len() >= 4, "system accounts, the local user, agent-7: {all}");
    let shown = cli(&["accounts", "show", &id]);
    assert_eq!((shown["balance_micros"].as_i64(), shown["pending_micros"].as_i64()), (Some(5_000_000), Some(0)));
    // An account may be named by its name when no other has it, and the node's address may be
    // given as the OpenAI base URL `serve` prints.
    let v1 = format!("{}/v1", node.base);
    let (ok, out) = run(&["accounts", "show", "agent-7", "--url", &v1, "--data-dir", &dir, "--json"], &[]);
    assert!(ok && serde_json::from_str::<Value>(&out).unwrap()["id"] == id.as_str(), "{out}");
    // Names are handles: a second account of one name is refused.
    cli(&["accounts", "create", "twin"]);
    let (ok, out) = run(&["accounts", "create", "twin", "--url", &node.base, "--data-dir", &dir], &[]);
    assert!(!ok && out.contains("already named \"twin\""), "{out}");
    // An empty TOKENOMY_ADMIN_KEY is unset: the data dir's admin.key is used.
    let (ok, out) = run(&["accounts", "show", "twin", "--url", &node.base, "--data-dir", &dir], &[("TOKENOMY_ADMIN_KEY", std::path::Path::new(""))]);
    assert!(ok, "{out}");
    let (ok, out) = run(&["credits", "mint", "nobody", "1", "--url", &node.base, "--data-dir", &dir], &[]);
    assert!(!ok && out.contains("no account is named \"nobody\""), "{out}");
    let keys = cli(&["keys", "list", &id]);
    assert_eq!(keys["data"][0]["spend"]["day_remaining_micros"], 1);
    // Raising the cap takes effect at the key's next request.
    let key_id = k["key_id"].as_str().unwrap();
    let changed = cli(&["keys", "limits", key_id, "--spend-cap-day-micros", "1000000", "--rpm", "30", "--remove", "spend-cap-month-micros"]);
    assert_eq!((changed["spend_cap_day_micros"].as_i64(), changed["rpm"].as_i64(), changed["spend_cap_month_micros"].as_i64()), (Some(1_000_000), Some(30), None));
    // Changing one limit keeps the others (raising a rate does not drop a budget); --remove drops one.
    let tpm = cli(&["keys", "limits", key_id, "--tpm", "5000"]);
    assert_eq!((tpm["spend_cap_day_micros"].as_i64(), tpm["rpm"].as_i64(), tpm["tpm"].as_i64()), (Some(1_000_000), Some(30), Some(5000)));
    let removed = cli(&["keys", "limits", key_id, "--remove", "rpm", "--remove", "tpm"]);
    assert_eq!((removed["spend_cap_day_micros"].as_i64(), removed["rpm"].as_i64(), removed["tpm"].as_i64()), (Some(1_000_000), None, None));
    assert_eq!(cli(&["keys", "show", key_id]), removed);
    let (ok, out) = run(&["keys", "limits", key_id, "--url", &node.base, "--data-dir", &dir], &[]);
    assert!(!ok && out.contains("nothing to change"), "{out}");
    let r = reqwest::blocking::Client::new().post(format!("{}/v1/chat/completions", node.base)).bearer_auth(key).json(&body).send().unwrap();
    let receipt = r.headers()["tokenomy-receipt"].to_str().unwrap().to_string();
    assert_eq!(r.status().as_u16(), 200, "{}", r.text().unwrap());
    let spent = cli(&["keys", "list", &id])["data"][0]["spend"]["day_micros"].as_i64().unwrap();
    assert!(spent > 0);
    assert_eq!(cli(&["accounts", "show", &id])["balance_micros"].as_i64(), Some(5_000_000 - spent));
    // The charge is given back, once.
    let refunded = cli(&["credits", "refund", &receipt]);
    assert_eq!((refunded["transfer"]["code"].as_str(), refunded["transfer"]["amount_micros"].as_i64()), (Some("refund"), Some(spent)), "{refunded}");
    assert_eq!(cli(&["accounts", "show", &id])["balance_micros"].as_i64(), Some(5_000_000));
    assert_eq!(cli(&["credits", "refund", &receipt]), refunded, "a retry is the same refund");
    let (ok, out) = run(&["credits", "refund", &receipt, "--amount-micros", "1", "--url", &node.base, "--data-dir", &dir], &[]);
    assert!(!ok && out.contains("already refunded"), "{out}");
    assert_eq!(cli(&["ledger", "check"])["ok"], true);
    // The charge and its refund in today's usage, for the account and for the ledger.
    let usage = cli(&["ledger", "usage", "--account", "agent-7", "--days", "1", "--by-model"]);
    let today: Vec<_> = usage["data"][0]["results"].as_array().unwrap().iter().map(|r| (r["model"].clone(), r["charged_micros"].as_i64(), r["refunded_micros"].as_i64())).collect();
    assert_eq!(today, [(Value::Null, Some(0), Some(spent)), (json!("smollm2"), Some(spent), Some(0))], "{usage}");
    let ledger = cli(&["ledger", "usage"]);
    assert_eq!(ledger["data"].as_array().unwrap().len(), 7, "{ledger}");
    assert!(ledger["data"][6]["results"][0]["num_model_requests"].as_u64() >= Some(1), "{ledger}");
    // Read by a person: a line per model and day, the refund a line of its own.
    let (ok, out) = run(&["ledger", "usage", "--account", &id, "--days", "1", "--by-model", "--url", &node.base, "--data-dir", &dir], &[]);
    let now_s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let (y, m, d) = tokenomy_core::civil_from_days((now_s / 86_400) as i64);
    let lines: Vec<Vec<&str>> = out.lines().skip(1).map(|l| l.split_whitespace().collect()).collect();
    let (day, charged) = (format!("{y:04}-{m:02}-{d:02}"), format!("{}.{:06}", spent / 1_000_000, spent % 1_000_000));
    assert!(ok && lines.len() == 2, "{out}");
    assert_eq!((lines[0][0], lines[0][1], lines[0][6]), (day.as_str(), "(refunds)", format!("-{charged}").as_str()), "{out}");
    assert_eq!((lines[1][1], lines[1][2], lines[1][6]), ("smollm2", "1", charged.as_str()), "{out}");
    let (ok, out) = run(&["ledger", "usage", "--account", &id, "--days", "1", "--by-key", "--url", &node.base, "--data-dir", &dir], &[]);
    let keyed: Vec<Vec<&str>> = out.lines().skip(1).map(|l| l.split_whitespace().collect()).collect();
    assert!(ok && keyed.iter().any(|l| l.len() == 8 && l[7] == key_id && l[2] == "1"), "the charge's key: {out}");
    let (ok, out) = run(&["ledger", "usage", "--days", "1", "--by-account", "--url", &node.base, "--data-dir", &dir], &[]);
    let accounts: Vec<Vec<&str>> = out.lines().skip(1).map(|l| l.split_whitespace().collect()).collect();
    assert!(ok && accounts.iter().any(|l| l.len() == 8 && l[7] == id && l[2] == "1"), "the account's line: {out}");
    let (ok, out) = run(&["ledger", "usage", "--days", "40", "--url", &node.base, "--data-dir", &dir], &[]);
    assert!(!ok && out.contains("--days") && out.contains("1..=31"), "{out}");

    let (ok, out) = run(&["keys", "create", &id, "--spend-cap-day-micros=-5", "--url", &node.base, "--data-dir", &dir], &[]);
    assert!(!ok && out.contains("spend cap"), "{out}");
    // Scopes given as a list.
    let both = cli(&["keys", "create", &id, "--scope", "inference,transfer"]);
    assert_eq!(both["scopes"], json!(["inference", "transfer"]), "{both}");
    // Errors read as a person reads them, without a backtrace even where RUST_BACKTRACE is set,
    // and say what is wrong (the treasury is what may not be minted to).
    let (ok, out) = run(&["credits", "mint", "treasury", "1", "--url", &node.base, "--data-dir", &dir], &[("RUST_BACKTRACE", std::path::Path::new("1"))]);
    assert!(!ok && out.contains("not to the treasury") && !out.contains("backtrace") && out.lines().count() <= 2, "{out}");
    // A saved error answer given to `verify` is named as one.
    let error = std::path::Path::new(&dir).join("not-a-receipt.json");
    std::fs::write(&error, r#"{"error": {"message": "No receipt \"rcpt_x\".", "type": "invalid_request_error"}}"#).unwrap();
    let (ok, out) = run(&["verify", error.to_str().unwrap(), "--key", std::path::Path::new(&dir).join("node.pub").to_str().unwrap()], &[]);
    assert!(!ok && out.contains("an error answer, not a receipt"), "{out}");
    // A file of a ledger's node keys (`GET /v1/node/keys`, here with another node's key
    // before this one's): `verify` uses the key of the node the receipt names.
    let get = |path: &str| reqwest::blocking::Client::new().get(format!("{}{path}", node.base)).bearer_auth(key).send().unwrap().text().unwrap();
    let node_keys = get("/v1/node/keys");
    assert_eq!(node_keys, std::fs::read_to_string(std::path::Path::new(&dir).join("node.pub")).unwrap(), "one node: its own key");
    let other = tokenomy_receipts::SignerKey::from_seed("other.node/log", &[7; 32]).unwrap().verifier().to_string();
    let (bundle, keys) = (std::path::Path::new(&dir).join("r.json"), std::path::Path::new(&dir).join("ledger.pub"));
    std::fs::write(&bundle, get(&format!("/v1/receipts/{receipt}"))).unwrap();
    std::fs::write(&keys, format!("{other}\n{node_keys}")).unwrap();
    let (ok, out) = run(&["verify", bundle.to_str().unwrap(), "--key", keys.to_str().unwrap()], &[]);
    assert!(ok && out.starts_with("ok: receipt"), "{out}");
    std::fs::write(&keys, format!("{other}\n{}\n", tokenomy_receipts::SignerKey::from_seed("third.node/log", &[8; 32]).unwrap().verifier())).unwrap();
    let (ok, out) = run(&["verify", bundle.to_str().unwrap(), "--key", keys.to_str().unwrap()], &[]);
    assert!(!ok && out.contains("none of the 2 keys"), "{out}");
    // Something that is not a receipt at all is named as such, keys file or not.
    std::fs::write(&bundle, "not json").unwrap();
    let (ok, out) = run(&["verify", bundle.to_str().unwrap(), "--key", keys.to_str().unwrap()], &[]);
    assert!(!ok && out.contains("not valid JSON"), "{out}");
}
