//! OpenAI's Responses API (`/v1/responses`) against the real engine: the same answers, usage and
//! charges as chat completions, in response objects and streaming events; conversations kept
//! for `previous_response_id`; bad input refused in OpenAI's shape.

use axum::http::StatusCode;
use serde_json::{json, Value};
use sha2::Digest;

use crate::billing::node;
use crate::{assert_error, post, send, solo_state, Reply, MODEL};

fn events(r: &Reply) -> Vec<Value> {
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    r.sse_data().iter().map(|d| serde_json::from_str(d).unwrap()).collect()
}

fn output_text(response: &Value) -> String {
    let items = response["output"].as_array().unwrap();
    items.iter().filter(|i| i["type"] == "message").flat_map(|i| i["content"].as_array().unwrap()).map(|c| c["text"].as_str().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_is_the_chat_answer_in_responses_shape_streamed_or_not() {
    let s = solo_state();
    let chat = json!({"model": MODEL, "temperature": 0, "max_tokens": 12,
        "messages": [{"role": "system", "content": "You are a concise assistant."}, {"role": "user", "content": "What is the capital of France?"}]});
    let c = post(&s, "/v1/chat/completions", chat).await.json();
    let body = json!({"model": MODEL, "temperature": 0, "max_output_tokens": 12, "instructions": "You are a concise assistant.",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "What is the capital of France?"}]}]});
    let r = post(&s, "/v1/responses", body.clone()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let v = r.json();
    assert!(v["id"].as_str().unwrap().starts_with("resp_"), "{v}");
    assert_eq!((v["object"].as_str(), v["model"].as_str()), (Some("response"), Some(MODEL)));
    assert_eq!(output_text(&v), c["choices"][0]["message"]["content"].as_str().unwrap());
    assert_eq!(v["usage"]["input_tokens"], c["usage"]["prompt_tokens"]);
    assert_eq!(v["usage"]["output_tokens"], c["usage"]["completion_tokens"]);
    let status = if c["choices"][0]["finish_reason"] == "length" { "incomplete" } else { "completed" };
    assert_eq!(v["status"], status, "{v}");
    assert_eq!(r.headers["x-request-id"].len(), 32);

    // Streamed: numbered events from `response.created` to the end, deltas that add up to
    // the text, and the same usage.
    let mut sb = body;
    sb["stream"] = json!(true);
    let ev = events(&post(&s, "/v1/responses", sb).await);
    let kinds: Vec<&str> = ev.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(&kinds[..4], ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"], "{kinds:?}");
    assert_eq!(kinds.last().copied(), Some(if status == "completed" { "response.completed" } else { "response.incomplete" }));
    for (i, e) in ev.iter().enumerate() {
        assert_eq!(e["sequence_number"], i, "{e}");
    }
    let deltas: String = ev.iter().filter(|e| e["type"] == "response.output_text.delta").map(|e| e["delta"].as_str().unwrap()).collect();
    let last = &ev.last().unwrap()["response"];
    assert_eq!(deltas, output_text(last));
    assert_eq!(deltas, output_text(&v));
    assert_eq!(last["usage"]["output_tokens"], v["usage"]["output_tokens"]);
    assert_eq!(last["usage"]["input_tokens"], v["usage"]["input_tokens"]);

    // Cut by max_output_tokens: incomplete, and says why, streamed or not.
    let long = json!({"model": MODEL, "max_output_tokens": 3, "input": "Write a long story about a dragon."});
    let v = post(&s, "/v1/responses", long.clone()).await.json();
    assert_eq!((v["status"].as_str(), v["incomplete_details"]["reason"].as_str()), (Some("incomplete"), Some("max_output_tokens")), "{v}");
    assert_eq!(v["output"][0]["status"], "incomplete");
    assert_eq!(v["usage"]["output_tokens"], 3);
    let mut ls = long;
    ls["stream"] = json!(true);
    let ev = events(&post(&s, "/v1/responses", ls).await);
    assert_eq!(ev.last().unwrap()["type"], "response.incomplete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn previous_response_id_continues_a_kept_conversation() {
    let s = solo_state();
    let first = post(&s, "/v1/responses", json!({"model": MODEL, "temperature": 0, "max_output_tokens": 8, "instructions": "Be brief.", "input": "My name is Ada."})).await.json();
    let id = first["id"].as_str().unwrap();
    // Its input is listed as items (a string input is one user message).
    let items = send(&s, "GET", &format!("/v1/responses/{id}/input_items"), None).await.json();
    assert_eq!(items["data"].as_array().unwrap().len(), 1, "{items}");
    let item = &items["data"][0];
    assert_eq!((item["type"].as_str(), item["role"].as_str(), item["content"][0]["text"].as_str()), (Some("message"), Some("user"), Some("My name is Ada.")));
    assert_eq!(items["first_id"], item["id"]);
    let body = json!({"model": MODEL, "temperature": 0, "max_output_tokens": 8, "previous_response_id": id, "input": "What is my name?"});
    let second = post(&s, "/v1/responses", body.clone()).await;
    assert_eq!(second.status, StatusCode::OK, "{}", second.text);
    let second = second.json();
    // The same body, counted before it is sent, comes to the tokens it was charged for.
    let counted = post(&s, "/v1/responses/input_tokens", body).await.json();
    assert_eq!(counted, json!({"object": "response.input_tokens", "input_tokens": second["usage"]["input_tokens"]}));
    assert_eq!(second["previous_response_id"], id);
    // The prompt is the whole conversation (the first answer included), without the first
    // request's instructions: as the same turns sent to chat completions count it.
    let messages = json!([{"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": output_text(&first)}, {"role": "user", "content": "What is my name?"}]);
    let c = post(&s, "/v1/chat/completions", json!({"model": MODEL, "max_tokens": 1, "messages": messages})).await.json();
    assert_eq!(second["usage"]["input_tokens"], c["usage"]["prompt_tokens"], "{second}");

    // Kept responses can be fetched and deleted; a request that says `store: false` is not kept.
    let sid = second["id"].as_str().unwrap();
    assert_eq!(send(&s, "GET", &format!("/v1/responses/{sid}"), None).await.json(), second);
    let d = send(&s, "DELETE", &format!("/v1/responses/{sid}"), None).await.json();
    assert_eq!(d, json!({"id": sid, "object": "response", "deleted": true}));
    assert_error(&send(&s, "GET", &format!("/v1/responses/{sid}"), None).await, StatusCode::NOT_FOUND);
    let gone = post(&s, "/v1/responses", json!({"model": MODEL, "previous_response_id": sid, "input": "Hi"})).await;
    assert_eq!(assert_error(&gone, StatusCode::BAD_REQUEST)["param"], "previous_response_id");
    let unkept = post(&s, "/v1/responses", json!({"model": MODEL, "store": false, "max_output_tokens": 2, "input": "Hi"})).await.json();
    assert_eq!(unkept["store"], false);
    assert_error(&send(&s, "GET", &format!("/v1/responses/{}", unkept["id"].as_str().unwrap()), None).await, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn bad_responses_input_is_refused_in_openai_shape() {
    let s = solo_state();
    let cases = [
        (json!({"input": "Hi"}), "model"),
        (json!({"model": MODEL}), "input"),
        (json!({"model": MODEL, "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]}]}), "input.0.content.0"),
        (json!({"model": MODEL, "input": [{"type": "item_reference", "id": "msg_1"}]}), "input.0"),
        (json!({"model": MODEL, "input": [{"type": "web_search_call", "id": "ws_1"}]}), "input.0.type"),
        (json!({"model": MODEL, "input": [{"role": "robot", "content": "Hi"}]}), "input.0.role"),
        (json!({"model": MODEL, "input": "Hi", "tools": [{"type": "web_search"}]}), "tools.0.type"),
        (json!({"model": MODEL, "input": "Hi", "tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": []}}), "tool_choice"),
        (json!({"model": MODEL, "input": "Hi", "text": {"format": {"type": "xml"}}}), "text.format.type"),
        (json!({"model": MODEL, "input": "Hi", "background": true}), "background"),
        (json!({"model": MODEL, "input": "Hi", "reasoning": {"effort": "extreme"}}), "reasoning.effort"),
        (json!({"model": MODEL, "input": []}), "input"),
        (json!({"model": MODEL, "input": "Hi", "max_output_tokens": 0}), "max_output_tokens"),
        (json!({"model": MODEL, "input": "Hi", "text": {"format": {"type": "json_schema", "name": "x"}}}), "text.format"),
        // A wrong type is refused, not read as absent (`store: "no"` would keep the conversation).
        (json!({"model": MODEL, "input": "Hi", "store": "no"}), "store"),
        (json!({"model": MODEL, "input": "Hi", "stream": "yes"}), "stream"),
        (json!({"model": MODEL, "input": "Hi", "temperature": "hot"}), "temperature"),
        (json!({"model": MODEL, "input": "Hi", "truncation": "sometimes"}), "truncation"),
        (json!({"model": MODEL, "input": "Hi", "metadata": 5}), "metadata"),
        // OpenAI's bounds: a response echoes its metadata, and a node keeps responses.
        (json!({"model": MODEL, "input": "Hi", "metadata": {"k": "v".repeat(513)}}), "metadata"),
        (json!({"model": MODEL, "input": "Hi", "metadata": (0..17).map(|i| (format!("k{i}"), json!("v"))).collect::<serde_json::Map<_, _>>()}), "metadata"),
        (json!({"model": MODEL, "input": "Hi", "top_logprobs": 50}), "top_logprobs"),
        (json!({"model": MODEL, "input": [{"role": "user"}]}), "input.0.content"),
        // Every call answered by its own output, before anything else is said.
        (json!({"model": MODEL, "input": [{"role": "user", "content": "Hi"}, {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c2", "output": "x"}]}), "input"),
        (json!({"model": MODEL, "input": [{"role": "user", "content": "Hi"}, {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"role": "user", "content": "and?"}]}), "input"),
        (json!({"model": "nope", "input": "Hi"}), "model"),
        (json!({"model": 5, "input": "Hi"}), "model"),
        (json!({"model": MODEL, "input": "Hi", "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nonsense"}}}}), "text.format.schema"),
    ];
    for (body, param) in cases {
        let r = post(&s, "/v1/responses", body.clone()).await;
        let status = if param == "model" && body["model"] == "nope" { StatusCode::NOT_FOUND } else { StatusCode::BAD_REQUEST };
        let e = assert_error(&r, status);
        if status == StatusCode::BAD_REQUEST {
            assert_eq!(e["param"], param, "{body}: {e}");
            // Named as this API names its fields, and saying what is wrong.
            let message = e["message"].as_str().unwrap();
            assert!(!message.contains("json_schema."), "{body}: {e}");
            if body["model"] == 5 {
                assert!(message.contains("must be a string"), "{e}");
            }
        }
    }
    // A kept response's events are not replayed: a 400, not a body an SDK would read as no events.
    let kept = post(&s, "/v1/responses", json!({"model": MODEL, "max_output_tokens": 1, "input": "Hi"})).await.json();
    assert_eq!(kept["usage"]["input_tokens_details"]["cache_write_tokens"], 0, "{kept}");
    let id = kept["id"].as_str().unwrap();
    assert_eq!(assert_error(&send(&s, "GET", &format!("/v1/responses/{id}?stream=true"), None).await, StatusCode::BAD_REQUEST)["param"], "stream");
    assert_eq!(send(&s, "GET", &format!("/v1/responses/{id}?stream=false"), None).await.status, StatusCode::OK);
    // No new turn: refused, not read as a prefill that goes on writing the last answer.
    let empty = post(&s, "/v1/responses", json!({"model": MODEL, "max_output_tokens": 2, "previous_response_id": id, "input": []})).await;
    assert_eq!(assert_error(&empty, StatusCode::BAD_REQUEST)["param"], "input");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_is_charged_and_its_receipt_names_the_body_sent() {
    let n = node(None, "", &[]).await;
    let (acc, key) = n.funded("responses-user", 1_000_000).await;
    let (b0, _) = n.balance(&acc).await;
    let body = json!({"model": MODEL, "temperature": 0, "max_output_tokens": 6, "input": "Name a color."}).to_string();
    let auth = format!("Bearer {key}");
    let r = crate::request(&n.state, "POST", "/v1/responses", Some(&body), &[("authorization", &auth)]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let v = r.json();
    let rid = r.headers["tokenomy-receipt"].to_str().unwrap();
    assert_eq!(v["receipt"]["id"], rid);
    let amount = v["receipt"]["amount_micros"].as_i64().unwrap();
    assert!(amount > 0, "{v}");
    assert_eq!(n.balance(&acc).await, (b0 - amount, 0), "charged exactly the receipt");
    let bundle = n.call("GET", &format!("/v1/receipts/{rid}"), None, &key).await;
    let receipt = tokenomy_receipts::verify_bundle(&bundle.text, &n.key()).unwrap().receipt;
    assert_eq!(receipt.request_sha256, <[u8; 32]>::from(sha2::Sha256::digest(body.as_bytes())));
    assert_eq!(receipt.completion_tokens, v["usage"]["output_tokens"].as_u64().unwrap());
    assert_eq!(receipt.prompt_tokens, v["usage"]["input_tokens"].as_u64().unwrap());

    // A kept response is its account's alone.
    let id = v["id"].as_str().unwrap();
    assert_eq!(n.call("GET", &format!("/v1/responses/{id}"), None, &key).await.json()["id"], id);
    let (_, other) = n.funded("responses-other", 1_000_000).await;
    assert_error(&n.call("GET", &format!("/v1/responses/{id}"), None, &other).await, StatusCode::NOT_FOUND);
    let r = n.call("POST", "/v1/responses", Some(json!({"model": MODEL, "previous_response_id": id, "input": "Hi"})), &other).await;
    assert_error(&r, StatusCode::BAD_REQUEST);
    assert_error(&n.call("DELETE", &format!("/v1/responses/{id}"), None, &other).await, StatusCode::NOT_FOUND);
    n.check().await;
}

/// On a PostgreSQL ledger, kept responses are in its database: a conversation answered by one
/// node is continued (streamed), read, listed and deleted through another, and stays its
/// account's own there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_of_one_postgres_ledger_share_kept_responses() {
    let Ok(server) = std::env::var("TOKENOMY_TEST_POSTGRES_URL") else {
        return eprintln!("SKIP PostgreSQL: TOKENOMY_TEST_POSTGRES_URL is not set");
    };
    let db = "tokenomy_api_shared_responses";
    let a = node(Some(&server), db, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("{}/{db}", server.rsplit_once('/').unwrap().0);
    let opts = tokenomy_billing::OpenOptions { data_dir: dir.path().into(), database_url: Some(url), origin: Some("test.tokenomy/b".into()), env: Default::default() };
    let (billing_b, _) = tokenomy_billing::Billing::open(opts).await.unwrap();
    let b = tokenomy_api::AppState::new(crate::shared_engine(), Default::default()).with_billing(billing_b, false);
    let key = a.first.user_key.clone();
    let on_b = |method: &'static str, uri: String, body: Option<Value>, key: String| {
        let b = b.clone();
        async move {
            let auth = format!("Bearer {key}");
            crate::request(&b, method, &uri, body.map(|v| v.to_string()).as_deref(), &[("authorization", &auth)]).await
        }
    };

    let first = a.call("POST", "/v1/responses", Some(json!({"model": MODEL, "temperature": 0, "max_output_tokens": 8, "input": "My name is Ada."})), &key).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text);
    let first = first.json();
    let id = first["id"].as_str().unwrap().to_string();
    let body = json!({"model": MODEL, "temperature": 0, "max_output_tokens": 8, "previous_response_id": id, "input": "What is my name?", "stream": true});
    let evs = events(&on_b("POST", "/v1/responses".into(), Some(body.clone()), key.clone()).await);
    let done = &evs.last().unwrap()["response"];
    assert_eq!(done["previous_response_id"], json!(id), "{done}");
    // Continued, not started anew: the prompt holds the first turn and its answer.
    let mut alone = body.clone();
    alone.as_object_mut().unwrap().remove("previous_response_id");
    alone["stream"] = json!(false);
    let counted_alone = on_b("POST", "/v1/responses/input_tokens".into(), Some(alone), key.clone()).await.json();
    assert!(done["usage"]["input_tokens"].as_u64().unwrap() > counted_alone["input_tokens"].as_u64().unwrap(), "{done} {counted_alone}");

    // Kept before its last event went out: the other node reads it at once.
    let sid = done["id"].as_str().unwrap().to_string();
    assert_eq!(a.call("GET", &format!("/v1/responses/{sid}"), None, &key).await.json(), *done);
    let items = on_b("GET", format!("/v1/responses/{id}/input_items"), None, key.clone()).await.json();
    assert_eq!(items["data"][0]["content"][0]["text"], "My name is Ada.", "{items}");
    // Another account sees none of it, on either node.
    let (_, other) = a.funded("other", 1_000_000).await;
    assert_error(&on_b("GET", format!("/v1/responses/{id}"), None, other.clone()).await, StatusCode::NOT_FOUND);
    assert_error(&a.call("DELETE", &format!("/v1/responses/{id}"), None, &other).await, StatusCode::NOT_FOUND);
    // Deleted through one node, gone from both.
    assert_eq!(on_b("DELETE", format!("/v1/responses/{id}"), None, key.clone()).await.json()["deleted"], true);
    assert_error(&a.call("GET", &format!("/v1/responses/{id}"), None, &key).await, StatusCode::NOT_FOUND);
    let gone = a.call("POST", "/v1/responses", Some(json!({"model": MODEL, "previous_response_id": id, "input": "Hi"})), &key).await;
    assert_eq!(assert_error(&gone, StatusCode::BAD_REQUEST)["param"], "previous_response_id");
}
