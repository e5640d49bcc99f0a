//! Upstreams: a node serving, through another real tokenomy node, a model it does not load
//! (or one whose local queue is full), charged and proven here on the usage the upstream reports.

use std::time::Duration;

use serde_json::{json, Value};

use crate::{free_port, model, run, serve_in, tempdir, Node, GEMMA, SMOLLM2};

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder().timeout(Duration::from_secs(120)).build().unwrap()
}

fn post(node: &Node, key: &str, body: &Value) -> reqwest::blocking::Response {
    client().post(format!("{}/v1/chat/completions", node.base)).bearer_auth(key).json(body).send().unwrap()
}

fn get(node: &Node, path: &str, key: &str) -> Value {
    client().get(format!("{}{path}", node.base)).bearer_auth(key).send().unwrap().json().unwrap()
}

fn balance(node: &Node) -> i64 {
    get(node, "/v1/me", &node.user_key())["account"]["balance_micros"].as_i64().unwrap()
}

fn ask(model: &str) -> Value {
    json!({"model": model, "temperature": 0, "max_tokens": 12, "messages": [{"role": "user", "content": "What is the capital of France?"}]})
}

/// The `data:` payloads of a streamed answer.
fn stream(node: &Node, body: &Value) -> Vec<Value> {
    let text = post(node, &node.user_key(), body).text().unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    text.lines().filter_map(|l| l.strip_prefix("data: ")).filter(|d| *d != "[DONE]").map(|d| serde_json::from_str(d).unwrap()).collect()
}

fn verify(node: &Node, receipt_id: &str) {
    let dir = tempdir("upstream-verify");
    let bundle = client().get(format!("{}/v1/receipts/{receipt_id}", node.base)).bearer_auth(node.user_key()).send().unwrap().text().unwrap();
    let key = client().get(format!("{}/v1/node/key", node.base)).send().unwrap().text().unwrap();
    std::fs::write(dir.join("r.json"), &bundle).unwrap();
    std::fs::write(dir.join("node.pub"), key).unwrap();
    let (ok, out) = run(&["verify", dir.join("r.json").to_str().unwrap(), "--key", dir.join("node.pub").to_str().unwrap()], &[]);
    assert!(ok, "{out}");
}

#[test]
fn a_model_served_by_an_upstream_node_is_charged_and_proven_here() {
    let smollm2 = model(SMOLLM2);
    let b = serve_in(&tempdir("upstream-b"), &["--model", smollm2.to_str().unwrap()], &[]);
    let gemma = model(GEMMA);
    let pool = format!("pool={}/v1", b.base);
    let b_key = b.user_key();
    let a = serve_in(&tempdir("upstream-a"), &["--model", gemma.to_str().unwrap(), "--upstream", &pool], &[("TOKENOMY_UPSTREAM_POOL_KEY", &b_key)]);

    // The upstream's models are listed beside the local one.
    let models = get(&a, "/v1/models", "");
    let ids: Vec<(&str, &str)> = models["data"].as_array().unwrap().iter().map(|m| (m["id"].as_str().unwrap(), m["owned_by"].as_str().unwrap())).collect();
    assert_eq!(ids, [("gemma3-270m", "tokenomy"), ("smollm2", "pool")], "{models}");

    // A whole answer: the upstream's words and usage, this node's charge and receipt.
    let direct: Value = post(&b, &b_key, &ask("smollm2")).json().unwrap();
    let (a0, b0) = (balance(&a), balance(&b));
    let r = post(&a, &a.user_key(), &ask("smollm2"));
    assert_eq!((r.status().as_u16(), r.headers()["tokenomy-upstream"].to_str().unwrap()), (200, "pool"));
    let v: Value = r.json().unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], direct["choices"][0]["message"]["content"], "{v}");
    // (The upstream's prefix cache may serve the repeated prompt: cached tokens may differ.)
    for field in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(v["usage"][field], direct["usage"][field], "{v}");
    }
    assert_eq!(v["model"], "smollm2");
    let receipt = &v["receipt"];
    assert_eq!(a0 - balance(&a), receipt["amount_micros"].as_i64().unwrap(), "{v}");
    assert!(b0 > balance(&b), "the upstream charged this node's key there");
    let signed = get(&a, &format!("/v1/receipts/{}", receipt["id"].as_str().unwrap()), &a.user_key())["receipt"].clone();
    assert_eq!((signed["prompt_tokens"].clone(), signed["completion_tokens"].clone()), (v["usage"]["prompt_tokens"].clone(), v["usage"]["completion_tokens"].clone()));
    assert_eq!(signed["model"], "smollm2");
    verify(&a, receipt["id"].as_str().unwrap());

    // A chat template adds tokens a body's bytes do not count (tools rendered with their
    // instructions, more tokens than this body has bytes): the upstream's count is charged
    // whole, and the usage shown is the receipt's.
    let tools = json!({"model": "smollm2", "max_tokens": 1, "tools": [{"type": "function", "function": {"name": "f"}}], "messages": [{"role": "user", "content": "x"}]});
    let direct_tools: Value = post(&b, &b_key, &tools).json().unwrap();
    let prompt_tokens = direct_tools["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt_tokens > tools.to_string().len() as u64, "{direct_tools}");
    let v: Value = post(&a, &a.user_key(), &tools).json().unwrap();
    assert_eq!(v["usage"]["prompt_tokens"], json!(prompt_tokens), "{v}");
    let signed = get(&a, &format!("/v1/receipts/{}", v["receipt"]["id"].as_str().unwrap()), &a.user_key())["receipt"].clone();
    assert_eq!(signed["prompt_tokens"], json!(prompt_tokens), "{signed}");

    // Streamed: the same words, the usage chunk with the receipt; without include_usage the
    // usage is not sent, and the answer is charged all the same.
    let mut body = ask("smollm2");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let chunks = stream(&a, &body);
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, direct["choices"][0]["message"]["content"].as_str().unwrap());
    let last = chunks.last().unwrap();
    assert_eq!((last["choices"].clone(), last["usage"]["completion_tokens"].clone()), (json!([]), direct["usage"]["completion_tokens"].clone()), "{last}");
    assert!(chunks.iter().all(|c| c["model"] == "smollm2" && c["id"] == chunks[0]["id"]));
    verify(&a, last["receipt"]["id"].as_str().unwrap());
    body["stream_options"] = json!(null);
    let before = balance(&a);
    let chunks = stream(&a, &body);
    assert!(chunks.iter().all(|c| c.get("usage").is_none() && c.get("receipt").is_none()), "{chunks:?}");
    assert_eq!(before - balance(&a), receipt["amount_micros"].as_i64().unwrap(), "the same answer, the same charge");

    // The Messages and Responses APIs go upstream too: their requests as chats, the answers
    // translated as a local one is, charged and proven here.
    let question = "What is the capital of France?";
    let before = balance(&a);
    let m: Value = client().post(format!("{}/v1/messages", a.base)).bearer_auth(a.user_key())
        .json(&json!({"model": "smollm2", "max_tokens": 12, "temperature": 0, "messages": [{"role": "user", "content": question}]}))
        .send().unwrap().json().unwrap();
    assert_eq!((m["type"].as_str(), m["content"][0]["text"].as_str()), (Some("message"), direct["choices"][0]["message"]["content"].as_str()), "{m}");
    assert_eq!(m["usage"]["output_tokens"], direct["usage"]["completion_tokens"], "{m}");
    verify(&a, m["receipt"]["id"].as_str().unwrap());
    let r: Value = client().post(format!("{}/v1/responses", a.base)).bearer_auth(a.user_key())
        .json(&json!({"model": "smollm2", "max_output_tokens": 12, "temperature": 0, "input": question}))
        .send().unwrap().json().unwrap();
    assert_eq!(r["output"][0]["content"][0]["text"].as_str(), direct["choices"][0]["message"]["content"].as_str(), "{r}");
    assert_eq!(r["usage"]["output_tokens"], direct["usage"]["completion_tokens"], "{r}");
    let kept = get(&a, &format!("/v1/responses/{}", r["id"].as_str().unwrap()), &a.user_key());
    assert_eq!(kept["output"], r["output"], "kept for previous_response_id like a local answer");
    let spent = m["receipt"]["amount_micros"].as_i64().unwrap() + r["receipt"]["amount_micros"].as_i64().unwrap();
    assert_eq!(before - balance(&a), spent);
    for (path, body, ends) in [
        ("/v1/messages", json!({"model": "smollm2", "max_tokens": 12, "stream": true, "messages": [{"role": "user", "content": question}]}), &["message_stop"][..]),
        ("/v1/responses", json!({"model": "smollm2", "max_output_tokens": 12, "stream": true, "input": question}), &["response.completed", "response.incomplete"][..]),
    ] {
        let text = client().post(format!("{}{path}", a.base)).bearer_auth(a.user_key()).json(&body).send().unwrap().text().unwrap();
        let events: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("event: ")).collect();
        assert!(events.last().is_some_and(|e| ends.contains(e)), "{path}: {text}");
        assert!(text.contains("\"receipt\""), "{path}: the stream names its receipt: {text}");
    }

    // A client that leaves a proxied stream is charged the whole answer: the node reads the
    // upstream to its end, for its usage.
    let before = balance(&a);
    let mut r = post(&a, &a.user_key(), &body);
    let mut first = [0u8; 16];
    std::io::Read::read_exact(&mut r, &mut first).unwrap();
    drop(r);
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    while balance(&a) == before {
        assert!(std::time::Instant::now() < deadline, "the stream the client left was not charged");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(before - balance(&a), receipt["amount_micros"].as_i64().unwrap());

    // So is one that leaves before a whole (not streamed) answer comes: the node asks the
    // upstream on a task of its own, settles, and leaves no hold waiting for its timeout.
    let before = balance(&a);
    let mut long = ask("smollm2");
    long["max_tokens"] = json!(48);
    let hasty = reqwest::blocking::Client::builder().timeout(Duration::from_millis(30)).build().unwrap();
    assert!(hasty.post(format!("{}/v1/chat/completions", a.base)).bearer_auth(a.user_key()).json(&long).send().is_err(), "the client gave up first");
    // (A bound for a liveness check, generous for a machine busy with other tests.)
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    while balance(&a) == before || get(&a, "/v1/me", &a.user_key())["account"]["pending_micros"] != 0 {
        assert!(std::time::Instant::now() < deadline, "the answer the client left was not settled");
        std::thread::sleep(Duration::from_millis(100));
    }

    // A keyed retry is replayed the first answer, headers included.
    let keyed = |_| client().post(format!("{}/v1/chat/completions", a.base)).bearer_auth(a.user_key()).header("idempotency-key", "proxied-once").json(&ask("smollm2")).send().unwrap();
    let (first, again) = (keyed(1), keyed(2));
    for h in ["x-request-id", "tokenomy-receipt", "tokenomy-upstream"] {
        assert_eq!(first.headers().get(h), again.headers().get(h), "{h}");
    }
    assert_eq!(again.headers()["tokenomy-upstream"], "pool");

    // Embeddings go upstream too: the upstream's vectors (in either encoding), charged here the
    // prompt tokens it counted, with a receipt whose output hash is the upstream's own (both
    // hash the vectors as `base64` gives them).
    for encoding in ["float", "base64"] {
        let body = json!({"model": "smollm2", "input": ["The capital of France", "Paris"], "encoding_format": encoding});
        let embed = |node: &Node, key: &str| client().post(format!("{}/v1/embeddings", node.base)).bearer_auth(key).json(&body).send().unwrap();
        let direct: Value = embed(&b, &b_key).json().unwrap();
        let before = balance(&a);
        let r = embed(&a, &a.user_key());
        assert_eq!((r.status().as_u16(), r.headers()["tokenomy-upstream"].to_str().unwrap()), (200, "pool"));
        let v: Value = r.json().unwrap();
        assert_eq!((&v["data"], &v["usage"], &v["model"]), (&direct["data"], &direct["usage"], &json!("smollm2")), "{encoding}: {v}");
        assert_eq!(before - balance(&a), v["receipt"]["amount_micros"].as_i64().unwrap(), "{v}");
        let ours = get(&a, &format!("/v1/receipts/{}", v["receipt"]["id"].as_str().unwrap()), &a.user_key())["receipt"].clone();
        let theirs = get(&b, &format!("/v1/receipts/{}", direct["receipt"]["id"].as_str().unwrap()), &b_key)["receipt"].clone();
        assert_eq!((&ours["output_sha256"], &ours["prompt_tokens"], &ours["completion_tokens"]), (&theirs["output_sha256"], &theirs["prompt_tokens"], &json!(0)), "{ours}");
        verify(&a, v["receipt"]["id"].as_str().unwrap());
    }

    // Text completions go upstream too, whole and streamed: the upstream's text under this
    // node's `cmpl-` id, charged here, with a receipt whose output hash is the upstream's own.
    let prompt = json!({"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0});
    let complete = |node: &Node, key: &str, body: &Value| client().post(format!("{}/v1/completions", node.base)).bearer_auth(key).json(body).send().unwrap();
    let direct: Value = complete(&b, &b_key, &prompt).json().unwrap();
    let before = balance(&a);
    let r = complete(&a, &a.user_key(), &prompt);
    assert_eq!((r.status().as_u16(), r.headers()["tokenomy-upstream"].to_str().unwrap()), (200, "pool"));
    let v: Value = r.json().unwrap();
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-") && v["object"] == "text_completion", "{v}");
    assert_eq!((&v["choices"][0]["text"], &v["usage"]["completion_tokens"], &v["model"]), (&direct["choices"][0]["text"], &direct["usage"]["completion_tokens"], &json!("smollm2")), "{v}");
    assert_eq!(before - balance(&a), v["receipt"]["amount_micros"].as_i64().unwrap(), "{v}");
    let ours = get(&a, &format!("/v1/receipts/{}", v["receipt"]["id"].as_str().unwrap()), &a.user_key())["receipt"].clone();
    let theirs = get(&b, &format!("/v1/receipts/{}", direct["receipt"]["id"].as_str().unwrap()), &b_key)["receipt"].clone();
    assert_eq!((&ours["output_sha256"], &ours["completion_tokens"]), (&theirs["output_sha256"], &theirs["completion_tokens"]), "{ours}");
    verify(&a, v["receipt"]["id"].as_str().unwrap());
    let mut streamed = prompt.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let text = complete(&a, &a.user_key(), &streamed).text().unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    let chunks: Vec<Value> = text.lines().filter_map(|l| l.strip_prefix("data: ")).filter(|d| *d != "[DONE]").map(|d| serde_json::from_str(d).unwrap()).collect();
    let said: String = chunks.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
    assert_eq!(said, direct["choices"][0]["text"].as_str().unwrap(), "{text}");
    let last = chunks.last().unwrap();
    assert!(chunks.iter().all(|c| c["id"].as_str().unwrap().starts_with("cmpl-")), "{text}");
    assert_eq!(last["usage"]["completion_tokens"], direct["usage"]["completion_tokens"], "{last}");
    verify(&a, last["receipt"]["id"].as_str().unwrap());

    // The token counters are not forwarded, and say so; bad limits are refused here.
    let count = json!({"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]});
    let r = client().post(format!("{}/v1/messages/count_tokens", a.base)).bearer_auth(a.user_key()).json(&count).send().unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let e: Value = r.json().unwrap();
    assert!(e["error"]["message"].as_str().unwrap().contains("not /v1/messages/count_tokens"), "{e}");
    let mut negative = ask("smollm2");
    negative["max_tokens"] = json!(-1);
    let e: Value = post(&a, &a.user_key(), &negative).json().unwrap();
    assert_eq!((e["error"]["param"].as_str(), e["error"]["code"].as_str()), (Some("max_tokens"), Some("invalid_value")), "{e}");

    // The upstream's refusal of the request is passed on; nothing is charged for it.
    let before = balance(&a);
    let mut bad = ask("smollm2");
    bad["temperature"] = json!(5);
    let r = post(&a, &a.user_key(), &bad);
    assert_eq!(r.status().as_u16(), 400);
    let e: Value = r.json().unwrap();
    assert_eq!(e["error"]["param"], "temperature", "{e}");
    assert_eq!(post(&a, &a.user_key(), &ask("nothing")).status().as_u16(), 404);

    // The upstream gone: a 502 in OpenAI's shape, the hold voided.
    drop(b);
    let r = post(&a, &a.user_key(), &ask("smollm2"));
    assert_eq!(r.status().as_u16(), 502);
    let e: Value = r.json().unwrap();
    assert_eq!(e["error"]["code"], "upstream_error", "{e}");
    assert!(!e["error"]["message"].as_str().unwrap().contains("127.0.0.1"), "the upstream's address stays private: {e}");
    assert_eq!(balance(&a), before);
    let me = get(&a, "/v1/me", &a.user_key());
    assert_eq!(me["account"]["pending_micros"], 0, "{me}");
    let check = get(&a, "/admin/v1/ledger/check", &a.admin_key());
    assert_eq!(check["ok"], true, "{check}");
    let metrics = client().get(format!("{}/metrics", a.base)).send().unwrap().text().unwrap();
    // Seventeen requests went to the upstream; one failed it (the refused one was the client's fault).
    assert!(metrics.contains("tokenomy_upstream_requests_total{upstream=\"pool\"} 17"), "{metrics}");
    assert!(metrics.contains("tokenomy_upstream_failures_total{upstream=\"pool\"} 1"), "{metrics}");
}

#[test]
fn a_failing_upstream_gives_way_to_the_next() {
    let smollm2 = model(SMOLLM2);
    let b = serve_in(&tempdir("upstream-live"), &["--model", smollm2.to_str().unwrap()], &[]);
    let dir = tempdir("upstream-failover");
    // "dead" is the cheapest, so it is tried first: nothing listens on its port. "refused"
    // comes next: the node's key there is wrong (a 401, the operator's problem, not the
    // client's). "live" answers.
    let file = format!(
        "policy = \"cheapest\"\n\
         [[upstream]]\nname = \"dead\"\nbase_url = \"http://127.0.0.1:{}/v1\"\ncost_micros_per_mtok = 1\nconnect_timeout_ms = 2000\nmodels = {{ tiny = \"smollm2\" }}\n\
         [[upstream]]\nname = \"refused\"\nbase_url = \"{}/v1\"\napi_key = \"tk-not-a-key\"\ncost_micros_per_mtok = 2\nmodels = {{ tiny = \"smollm2\" }}\n\
         [[upstream]]\nname = \"live\"\nbase_url = \"{}/v1\"\napi_key_env = \"LIVE_KEY\"\ncost_micros_per_mtok = 100\nmodels = {{ tiny = \"smollm2\" }}\n",
        free_port(),
        b.base,
        b.base
    );
    std::fs::write(dir.join("upstreams.toml"), file).unwrap();
    let gemma = model(GEMMA);
    let b_key = b.user_key();
    let a = serve_in(&tempdir("upstream-front"), &["--model", gemma.to_str().unwrap(), "--upstreams", dir.join("upstreams.toml").to_str().unwrap()], &[("LIVE_KEY", &b_key)]);
    let first_sent = std::time::Instant::now();
    let r = post(&a, &a.user_key(), &ask("tiny"));
    assert_eq!((r.status().as_u16(), r.headers()["tokenomy-upstream"].to_str().unwrap()), (200, "live"));
    let v: Value = r.json().unwrap();
    assert_eq!(v["model"], "tiny", "answered under the name the client asked for: {v}");
    assert!(v["choices"][0]["message"]["content"].as_str().is_some_and(|t| !t.is_empty()), "{v}");
    verify(&a, v["receipt"]["id"].as_str().unwrap());
    let metrics = client().get(format!("{}/metrics", a.base)).send().unwrap().text().unwrap();
    assert!(metrics.contains("tokenomy_upstream_failures_total{upstream=\"dead\"} 1"), "{metrics}");
    assert!(metrics.contains("tokenomy_upstream_failures_total{upstream=\"refused\"} 1"), "{metrics}");
    // Having failed, both go last for 15 s: the next request goes straight to "live" (checked
    // when this machine ran the first answer in less than that).
    let r = post(&a, &a.user_key(), &ask("tiny"));
    assert_eq!((r.status().as_u16(), r.headers()["tokenomy-upstream"].to_str().unwrap()), (200, "live"));
    if first_sent.elapsed() < Duration::from_secs(14) {
        let metrics = client().get(format!("{}/metrics", a.base)).send().unwrap().text().unwrap();
        assert!(metrics.contains("tokenomy_upstream_requests_total{upstream=\"dead\"} 1"), "{metrics}");
    }

    // A configuration mistake stops the node at start, saying what is wrong.
    std::fs::write(dir.join("bad.toml"), "[[upstream]]\nname = \"x\"\nbase_url = \"ftp://x\"\n").unwrap();
    let (ok, out) = run(&["serve", "--model", gemma.to_str().unwrap(), "--upstreams", dir.join("bad.toml").to_str().unwrap(), "--data-dir", tempdir("upstream-bad").to_str().unwrap()], &[]);
    assert!(!ok && out.contains("base_url must be an http:// or https:// URL"), "{out}");
}

#[test]
fn a_full_local_queue_overflows_to_an_upstream_serving_the_same_model() {
    let smollm2 = model(SMOLLM2);
    let b = serve_in(&tempdir("overflow-b"), &["--model", smollm2.to_str().unwrap()], &[]);
    let pool = format!("pool={}/v1", b.base);
    let b_key = b.user_key();
    // Two slots and one queue place: a burst of eight would see five refused with 429.
    let a = serve_in(&tempdir("overflow-a"), &["--model", smollm2.to_str().unwrap(), "--queue-max", "1", "--upstream", &pool], &[("TOKENOMY_UPSTREAM_POOL_KEY", &b_key)]);
    let before = balance(&a);
    let key = a.user_key();
    let replies: Vec<(u16, Option<String>, i64)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let (a, key) = (&a, &key);
                s.spawn(move || {
                    let mut body = ask("smollm2");
                    body["max_tokens"] = json!(24);
                    body["messages"][0]["content"] = json!(format!("Count to {}.", i + 3));
                    // (Each with a key of its own: a key's refused local attempt must not stop
                    // its overflow.)
                    let r = client().post(format!("{}/v1/chat/completions", a.base)).bearer_auth(key).header("idempotency-key", format!("burst-{i}")).json(&body).send().unwrap();
                    let (status, upstream) = (r.status().as_u16(), r.headers().get("tokenomy-upstream").map(|v| v.to_str().unwrap().to_string()));
                    let v: Value = r.json().unwrap();
                    (status, upstream, v["receipt"]["amount_micros"].as_i64().unwrap_or(0))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(replies.iter().all(|(status, _, _)| *status == 200), "{replies:?}");
    let overflowed = replies.iter().filter(|(_, u, _)| u.as_deref() == Some("pool")).count();
    assert!((1..8).contains(&overflowed), "some served here, the rest by the pool: {replies:?}");
    let charged: i64 = replies.iter().map(|(_, _, amount)| amount).sum();
    assert_eq!(before - balance(&a), charged, "every answer charged here once, wherever it was served");

    // The Messages and Responses APIs overflow too.
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let (a, key) = (&a, &key);
                s.spawn(move || {
                    let (path, body) = match i % 2 {
                        0 => ("/v1/messages", json!({"model": "smollm2", "max_tokens": 24, "messages": [{"role": "user", "content": format!("Count to {}.", i + 3)}]})),
                        _ => ("/v1/responses", json!({"model": "smollm2", "max_output_tokens": 24, "input": format!("Count to {}.", i + 3)})),
                    };
                    client().post(format!("{}{path}", a.base)).bearer_auth(key).json(&body).send().unwrap().status().as_u16()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");

    // So do text completions, and embeddings once the embedding queue (16 places) is full.
    let before = balance(&a);
    let completions = burst(&a, &key, 8, |i| ("/v1/completions", json!({"model": "smollm2", "max_tokens": 24, "prompt": format!("Count to {}:", i + 3)})));
    let paragraph = "The ledger holds credits before a model generates and settles the exact amount after. ".repeat(12);
    let embeddings = burst(&a, &key, 20, |i| ("/v1/embeddings", json!({"model": "smollm2", "input": format!("{i}: {paragraph}")})));
    for (what, replies) in [("completions", &completions), ("embeddings", &embeddings)] {
        assert!(replies.iter().all(|(status, _, v)| *status == 200 && v["usage"]["prompt_tokens"].as_u64() > Some(0)), "{what}: {replies:?}");
        let overflowed = replies.iter().filter(|(_, u, _)| u.as_deref() == Some("pool")).count();
        assert!((1..replies.len()).contains(&overflowed), "{what}: some served here, the rest by the pool: {replies:?}");
    }
    let charged: i64 = completions.iter().chain(&embeddings).map(|(_, _, v)| v["receipt"]["amount_micros"].as_i64().unwrap()).sum();
    assert_eq!(before - balance(&a), charged, "every answer charged here once, wherever it was served");
    assert_eq!(get(&a, "/admin/v1/ledger/check", &a.admin_key())["ok"], true);
}

/// Sends `n` requests at once (`body(i)` gives each one's path and JSON): each one's status,
/// `tokenomy-upstream` header and JSON body.
fn burst(node: &Node, key: &str, n: usize, body: impl Fn(usize) -> (&'static str, Value) + Sync) -> Vec<(u16, Option<String>, Value)> {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let body = &body;
                s.spawn(move || {
                    let (path, body) = body(i);
                    let r = client().post(format!("{}{path}", node.base)).bearer_auth(key).json(&body).send().unwrap();
                    let (status, upstream) = (r.status().as_u16(), r.headers().get("tokenomy-upstream").map(|v| v.to_str().unwrap().to_string()));
                    (status, upstream, r.json().unwrap())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}
