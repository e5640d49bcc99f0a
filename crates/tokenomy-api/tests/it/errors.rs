use crate::*;
use serde_json::json;

#[tokio::test]
async fn malformed_json_is_a_400_in_openai_shape() {
    let s = state();
    let r = send(&s, "POST", "/v1/chat/completions", Some("{not json")).await;
    assert_error(&r, StatusCode::BAD_REQUEST);
    let r = send(&s, "POST", "/v1/chat/completions", Some(r#"{"model": "smollm2"}"#)).await;
    let e = assert_error(&r, StatusCode::BAD_REQUEST);
    assert!(e["message"].as_str().unwrap().contains("messages"), "{e}");
    assert_eq!(e["param"], "messages");
    // A field of the wrong type: 400 naming it (OpenAI's SDK raises BadRequestError), not 422.
    let r = send(&s, "POST", "/v1/chat/completions", Some(r#"{"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"}"#)).await;
    assert_eq!(assert_error(&r, StatusCode::BAD_REQUEST)["param"], "max_tokens");
    assert!(r.headers.contains_key("x-request-id"));
    let r = send(&s, "POST", "/v1/chat/completions", Some(r#"{"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}"#)).await;
    let e = assert_error(&r, StatusCode::BAD_REQUEST);
    assert!(e["message"].as_str().unwrap().contains("hot") && e["message"].as_str().unwrap().starts_with("The request body is JSON, but"), "{e}");
    let e = assert_error(&send(&s, "POST", "/v1/chat/completions", Some("{not json")).await, StatusCode::BAD_REQUEST);
    assert!(e["message"].as_str().unwrap().starts_with("The request body is not valid JSON"), "{e}");
}

/// An explicit `null` is a parameter left out, as OpenAI reads it: the SDKs send `null` for a
/// parameter passed as `None`.
#[tokio::test]
async fn null_parameters_read_as_left_out() {
    let s = state();
    let chat = json!({"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "logprobs": null,
        "top_logprobs": null, "stream": null, "stream_options": {"include_usage": null}, "n": null, "stop": null, "seed": null, "temperature": null});
    let r = post(&s, "/v1/chat/completions", chat).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert!(r.json()["choices"][0]["logprobs"].is_null(), "{}", r.text);
    let completion = json!({"model": "smollm2", "prompt": "Hi", "max_tokens": 2, "echo": null, "stream": null, "logprobs": null});
    let r = post(&s, "/v1/completions", completion).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
}

/// A request that no balance could buy (over the context) is told so before anything is held:
/// an unfunded caller gets the same 400 as a funded one, not a 402.
#[tokio::test]
async fn max_tokens_beyond_the_context_is_a_400_before_anything_is_held() {
    let s = state();
    for max_tokens in [100_000, 1_000_000_000] {
        let r = post(&s, "/v1/chat/completions", json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens})).await;
        assert_eq!(assert_error(&r, StatusCode::BAD_REQUEST)["code"], "context_length_exceeded");
    }
    for max_tokens in [0, -1] {
        let r = post(&s, "/v1/chat/completions", json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens})).await;
        let e = assert_error(&r, StatusCode::BAD_REQUEST);
        assert_eq!(e["param"], "max_tokens");
        assert!(e["message"].as_str().unwrap().starts_with("max_tokens must be a whole number of tokens from 1 to "), "{e}");
    }
}

#[tokio::test]
async fn unknown_model_is_404() {
    let s = state();
    let r = post(&s, "/v1/chat/completions", json!({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]})).await;
    let e = assert_error(&r, StatusCode::NOT_FOUND);
    assert_eq!(e["code"], "model_not_found");
    assert!(e["message"].as_str().unwrap().contains("gpt-9"));
}

/// A prompt of many special tokens is tokenized in time linear in its length: 60 000 short
/// messages (120 000 turn markers) used to hold a core for minutes in llama.cpp's cut at
/// special tokens before their 400; a completion prompt of the markers' text likewise.
#[tokio::test]
async fn many_short_messages_are_refused_without_holding_a_core() {
    let s = AppState::new(shared_engine(), ApiConfig { body_bytes_max: 4 * 1024 * 1024 });
    let messages: Vec<serde_json::Value> = (0..60_000).map(|i| json!({"role": "user", "content": format!("a{i}")})).collect();
    let r = post(&s, "/v1/chat/completions", json!({"model": MODEL, "max_tokens": 2, "messages": messages})).await;
    assert_eq!(assert_error(&r, StatusCode::BAD_REQUEST)["code"], "context_length_exceeded");
    let r = post(&s, "/v1/messages/count_tokens", json!({"model": MODEL, "messages": vec![json!({"role": "user", "content": "a"}); 60_000]})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert!(r.json()["input_tokens"].as_u64() > Some(240_000), "{}", r.text);
    let r = post(&s, "/v1/completions", json!({"model": MODEL, "max_tokens": 1, "prompt": "<|im_end|>x".repeat(100_000)})).await;
    assert_eq!(assert_error(&r, StatusCode::BAD_REQUEST)["code"], "context_length_exceeded");
}

#[tokio::test]
async fn a_prompt_longer_than_the_context_names_both_numbers() {
    let s = state();
    let long = "word ".repeat(3000);
    let r = post(&s, "/v1/completions", json!({"model": MODEL, "prompt": long, "max_tokens": 10})).await;
    let e = assert_error(&r, StatusCode::BAD_REQUEST);
    assert_eq!((e["code"].as_str(), e["param"].as_str()), (Some("context_length_exceeded"), Some("prompt")), "{e}");
    let m = e["message"].as_str().unwrap();
    assert!(m.contains("2048") && m.contains("3010") || m.contains("2048"), "{m}");
    let r = post(&s, "/v1/chat/completions", json!({"model": MODEL, "messages": [{"role": "user", "content": long}]})).await;
    let e = assert_error(&r, StatusCode::BAD_REQUEST);
    assert_eq!((e["code"].as_str(), e["param"].as_str()), (Some("context_length_exceeded"), Some("messages")), "{e}");
}

#[tokio::test]
async fn invalid_parameters_are_400_naming_the_parameter() {
    let s = state();
    let base = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]});
    for (field, value) in [
        ("temperature", json!(5)),
        ("top_p", json!(1.5)),
        ("n", json!(0)),
        ("n", json!(100)),
        ("max_tokens", json!(-1)),
        ("presence_penalty", json!(3)),
        ("top_logprobs", json!(50)),
        ("logit_bias", json!({"abc": 1})),
        ("logit_bias", json!({"5": 500})),
        ("logit_bias", json!({"49152": 5})),
        ("logit_bias", json!({"-3": 5})),
        ("stop", json!(["a", "b", "c", "d", "e"])),
        ("functions", json!([{"name": "f", "parameters": {"type": "object"}}])),
        ("function_call", json!("auto")),
        ("modalities", json!(["text", "audio"])),
        ("audio", json!({"voice": "alloy", "format": "wav"})),
        ("reasoning_effort", json!("extreme")),
        ("web_search_options", json!({"search_context_size": "high"})),
        ("verbosity", json!("terse")),
    ] {
        let mut body = base.clone();
        body[field] = value.clone();
        if field == "top_logprobs" {
            body["logprobs"] = json!(true);
        }
        let r = post(&s, "/v1/chat/completions", body).await;
        let e = assert_error(&r, StatusCode::BAD_REQUEST);
        assert_eq!(e["param"], field, "{field}={value}: {e}");
    }
    let r = post(&s, "/v1/chat/completions", json!({"model": MODEL, "messages": []})).await;
    assert_error(&r, StatusCode::BAD_REQUEST);
    let r = post(&s, "/v1/chat/completions", json!({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]})).await;
    assert_error(&r, StatusCode::BAD_REQUEST);
    // Only an assistant's message may lack content (its tool calls say it).
    for user in [json!({"role": "user"}), json!({"role": "user", "content": null})] {
        let r = post(&s, "/v1/chat/completions", json!({"model": MODEL, "messages": [user]})).await;
        assert_eq!(assert_error(&r, StatusCode::BAD_REQUEST)["param"], "messages[0].content");
    }
    // A tool result answers an assistant's call (a system reminder between them is fine).
    let call = json!({"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]});
    let between = json!([{"role": "user", "content": "hi"}, call, {"role": "system", "content": "be brief"}, {"role": "tool", "tool_call_id": "c1", "content": "ok"}]);
    let r = post(&s, "/v1/chat/completions", json!({"model": MODEL, "max_tokens": 1, "messages": between})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = post(&s, "/v1/chat/completions", json!({"model": MODEL, "messages": [{"role": "tool", "content": "x", "tool_call_id": "zz"}]})).await;
    assert_eq!(assert_error(&r, StatusCode::BAD_REQUEST)["param"], "messages[0]");
    // ...one of its calls: an id that names none is refused, as OpenAI refuses it.
    let wrong = json!([{"role": "user", "content": "hi"}, call, {"role": "tool", "tool_call_id": "c2", "content": "ok"}]);
    let r = post(&s, "/v1/chat/completions", json!({"model": MODEL, "messages": wrong})).await;
    assert_eq!(assert_error(&r, StatusCode::BAD_REQUEST)["param"], "messages[2].tool_call_id");
    // ...and the conversation goes on only once each call has its result (an agent that drops
    // one is told so, not answered and billed).
    let two = json!({"role": "assistant", "content": null, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
        {"id": "c2", "type": "function", "function": {"name": "f", "arguments": "{}"}}]});
    for (later, param, id) in [
        (json!([{"role": "user", "content": "and then?"}]), "messages[2]", "\"c1\""),
        (json!([{"role": "tool", "tool_call_id": "c1", "content": "ok"}, {"role": "user", "content": "and then?"}]), "messages[3]", "\"c2\""),
    ] {
        let mut messages = vec![json!({"role": "user", "content": "hi"}), two.clone()];
        messages.extend(later.as_array().unwrap().iter().cloned());
        let e = assert_error(&post(&s, "/v1/chat/completions", json!({"model": MODEL, "max_tokens": 1, "messages": messages})).await, StatusCode::BAD_REQUEST);
        assert_eq!(e["param"], param, "{e}");
        assert!(e["message"].as_str().unwrap().contains(id), "{e}");
    }
    let done = json!([{"role": "user", "content": "hi"}, two, {"role": "tool", "tool_call_id": "c2", "content": "ok"},
                      {"role": "tool", "tool_call_id": "c1", "content": "ok"}, {"role": "user", "content": "and then?"}]);
    let r = post(&s, "/v1/chat/completions", json!({"model": MODEL, "max_tokens": 1, "messages": done})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    // best_of is n or nothing (each candidate is a returned choice).
    for best_of in [1, 3] {
        let r = post(&s, "/v1/completions", json!({"model": MODEL, "prompt": "hi", "n": 2, "best_of": best_of, "max_tokens": 1})).await;
        assert_eq!(assert_error(&r, StatusCode::BAD_REQUEST)["param"], "best_of");
    }
    let r = post(&s, "/v1/completions", json!({"model": MODEL, "prompt": [999999999], "max_tokens": 1})).await;
    assert_error(&r, StatusCode::BAD_REQUEST);
    let r = post(&s, "/v1/completions", json!({"model": MODEL, "prompt": ""})).await;
    assert_error(&r, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn a_body_over_the_limit_is_413() {
    let s = state();
    let big = format!(r#"{{"model":"smollm2","prompt":"{}"}}"#, "x".repeat(100 * 1024));
    let r = send(&s, "POST", "/v1/completions", Some(&big)).await;
    assert_error(&r, StatusCode::PAYLOAD_TOO_LARGE);
    // A body declared too large is refused before any of it comes (here none ever does), in
    // the shape of the API it was sent to.
    for (uri, shape) in [("/v1/chat/completions", "/error/code"), ("/v1/messages", "/error/type")] {
        let never = axum::body::Body::from_stream(futures::stream::pending::<Result<bytes::Bytes, std::io::Error>>());
        let req = axum::http::Request::builder().method("POST").uri(uri).header("content-type", "application/json").header("content-length", "99999999999").body(never).unwrap();
        let resp = tokio::time::timeout(std::time::Duration::from_secs(5), tower::ServiceExt::oneshot(tokenomy_api::app(s.clone()), req)).await.expect("at once").unwrap();
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert!(resp.headers().contains_key("x-request-id"));
        let body: serde_json::Value = serde_json::from_slice(&http_body_util::BodyExt::collect(resp.into_body()).await.unwrap().to_bytes()).unwrap();
        assert_eq!(body.pointer(shape).and_then(|v| v.as_str()), Some("request_too_large"), "{body}");
    }
}

/// A body that is JSON but not an object is refused, not read as the fields in order.
#[tokio::test]
async fn a_body_that_is_not_an_object_is_400() {
    let s = state();
    for uri in ["/v1/embeddings", "/v1/chat/completions", "/v1/completions"] {
        let e = assert_error(&send(&s, "POST", uri, Some(r#"["smollm2","hello","float",null]"#)).await, StatusCode::BAD_REQUEST);
        assert_eq!(e["message"], "The request body must be a JSON object", "{uri}");
    }
}

#[tokio::test]
async fn unknown_routes_are_404_json() {
    let s = state();
    assert_error(&send(&s, "GET", "/v1/nothing", None).await, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn the_console_is_served_under_a_policy_that_keeps_keys_on_this_origin() {
    let s = state();
    let r = send(&s, "GET", "/", None).await;
    assert_eq!((r.status, r.headers["location"].to_str().unwrap()), (StatusCode::SEE_OTHER, "/console/"));
    for (uri, content_type) in [
        ("/console/", "text/html; charset=utf-8"),
        ("/console/app.js", "text/javascript; charset=utf-8"),
        ("/console/verify.js", "text/javascript; charset=utf-8"),
        ("/console/style.css", "text/css; charset=utf-8"),
    ] {
        let r = send(&s, "GET", uri, None).await;
        assert_eq!(r.status, StatusCode::OK, "{uri}");
        assert_eq!(r.headers["content-type"], content_type, "{uri}");
        let csp = r.headers["content-security-policy"].to_str().unwrap();
        for directive in ["default-src 'none'", "script-src 'self'", "connect-src 'self'", "frame-ancestors 'none'"] {
            assert!(csp.contains(directive), "{uri}: {csp}");
        }
        assert_eq!(r.headers["x-content-type-options"], "nosniff", "{uri}");
    }
    // Only the page's own files: no inline script for the policy to refuse.
    let page = send(&s, "GET", "/console/", None).await.text;
    assert!(page.contains(r#"<script type="module" src="/console/app.js">"#) && !page.contains("<script>"), "{page}");
    let e = assert_error(&send(&s, "GET", "/console/../admin.key", None).await, StatusCode::NOT_FOUND);
    assert_eq!(e["code"], "not_found");
    assert_error(&send(&s, "GET", "/console/secret.txt", None).await, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_known_route_asked_with_another_method_is_a_405_json() {
    let s = state();
    for (method, uri) in [("GET", "/v1/chat/completions"), ("DELETE", "/v1/models"), ("POST", "/admin/v1/ledger/check")] {
        let e = assert_error(&send(&s, method, uri, None).await, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(e["code"], "method_not_allowed", "{method} {uri}");
        assert_eq!(r_id_len(&send(&s, method, uri, None).await), 32, "an error's request id has a generation's form");
    }
    // Under the Messages API, in its shape.
    for (method, uri) in [("GET", "/v1/messages"), ("POST", "/v1/messages/nothing")] {
        let v = send(&s, method, uri, None).await.json();
        assert_eq!(v["type"], "error", "{method} {uri}: {v}");
        assert!(v["error"]["type"].is_string() && v["error"]["message"].is_string(), "{v}");
    }
}

fn r_id_len(r: &Reply) -> usize {
    r.headers["x-request-id"].to_str().unwrap().len()
}

#[tokio::test]
async fn a_body_the_messages_api_cannot_parse_is_answered_in_anthropic_shape() {
    let s = state();
    for uri in ["/v1/messages", "/v1/messages/count_tokens"] {
        let r = send(&s, "POST", uri, Some("{not json")).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{uri}: {}", r.text);
        let v = r.json();
        assert_eq!((v["type"].as_str(), v["error"]["type"].as_str()), (Some("error"), Some("invalid_request_error")), "{uri}: {v}");
        assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    }
    // A server tool (Anthropic runs those itself) is named as one, not as a bad schema.
    let body = json!({"model": "smollm2", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "web_search_20250305", "name": "web_search"}]});
    let r = send(&s, "POST", "/v1/messages", Some(&body.to_string())).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("\"web_search_20250305\" is not a client tool"), "{}", r.text);
    // Anthropic's temperature runs to 1, not to OpenAI's 2.
    let body = json!({"model": "smollm2", "max_tokens": 4, "temperature": 1.5, "messages": [{"role": "user", "content": "hi"}]});
    let r = send(&s, "POST", "/v1/messages", Some(&body.to_string())).await;
    assert_eq!((r.status, r.json()["error"]["type"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_request_error")), "{}", r.text);
    assert!(r.json()["error"]["message"].as_str().unwrap().starts_with("temperature: must be between 0 and 1"), "{}", r.text);
    // A model that is not a string is named as such, not as missing.
    for (model, says) in [(json!(5), "model: a string is required, got 5"), (json!(null), "model: field required")] {
        let body = json!({"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]});
        let r = send(&s, "POST", "/v1/messages", Some(&body.to_string())).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
        assert_eq!(r.json()["error"]["message"], says, "{}", r.text);
    }
}

#[tokio::test]
async fn overload_is_a_429_with_retry_after_and_everyone_else_is_answered() {
    let engine = engine_with(|c| {
        c.slots = 1;
        c.queue_max = 2;
    });
    let s = AppState::new(std::sync::Arc::new(engine), ApiConfig::default());
    let body = json!({"model": MODEL, "prompt": "Count: one, two,", "max_tokens": 24, "temperature": 0});
    let replies = futures::future::join_all((0..12).map(|_| post(&s, "/v1/completions", body.clone()))).await;
    let mut ok = 0;
    let mut busy = 0;
    for r in &replies {
        match r.status {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                assert!(r.headers.contains_key("retry-after"));
                assert_error(r, StatusCode::TOO_MANY_REQUESTS);
                busy += 1;
            }
            other => panic!("unexpected {other}: {}", r.text),
        }
    }
    assert!(ok >= 1 && busy >= 1, "ok={ok} busy={busy}");
    // and it keeps serving
    assert_eq!(post(&s, "/v1/completions", body).await.status, StatusCode::OK);
    // an operator sees the refusals on /metrics
    let page = send(&s, "GET", "/metrics", None).await.text;
    let count = |code: u16| {
        let prefix = format!("tokenomy_http_responses_total{{route=\"/v1/completions\",code=\"{code}\"}} ");
        page.lines().find_map(|l| l.strip_prefix(&prefix)).map(|v| v.trim().parse::<u64>().unwrap())
    };
    assert_eq!((count(200), count(429)), (Some(ok + 1), Some(busy)), "{page}");
    // The Messages API says it in Anthropic's words: 529 `overloaded_error`, which its SDKs retry.
    let body = json!({"model": MODEL, "max_tokens": 24, "messages": [{"role": "user", "content": "Count: one, two,"}]});
    let replies = futures::future::join_all((0..12).map(|_| post(&s, "/v1/messages", body.clone()))).await;
    let busy: Vec<&Reply> = replies.iter().filter(|r| r.status != StatusCode::OK).collect();
    assert!(!busy.is_empty() && busy.len() < replies.len(), "{:?}", replies.iter().map(|r| r.status).collect::<Vec<_>>());
    for r in busy {
        assert_eq!((r.status.as_u16(), r.json()["error"]["type"].as_str()), (529, Some("overloaded_error")), "{}", r.text);
        assert!(r.headers.contains_key("retry-after"));
    }
}

/// `--queue-max` bounds the generations waiting for a slot once every slot runs (the engine
/// counts each from the API's call to its end, against `--parallel` + `--queue-max`). A busy node with a full queue refuses the next request (it used to take a second
/// queue's worth into the worker's channel), a request whose choices could never all queue is a
/// 400, and places come back when a waiting request is admitted or its client leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_holds_queue_max_generations_and_gives_places_back() {
    use http_body_util::BodyExt;
    let s = AppState::new(
        std::sync::Arc::new(engine_with(|c| {
            c.slots = 1;
            c.queue_max = 2;
        })),
        ApiConfig::default(),
    );
    let queued = |s: AppState| async move {
        let m = send(&s, "GET", "/metrics", None).await.text;
        let line = m.lines().find(|l| l.starts_with("tokenomy_queue_depth")).expect("queue gauge").to_string();
        line.split_whitespace().last().unwrap().parse::<f64>().unwrap() as u64
    };
    let stream = |s: AppState, max_tokens: u32| async move {
        let body = json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": max_tokens, "ignore_eos": true, "stream": true});
        let req = axum::http::Request::builder()
            .method("POST")
            .uri("/v1/completions")
            .header("content-type", "application/json")
            .body(axum::body::Body::from(body.to_string()))
            .unwrap();
        let resp = tower::ServiceExt::oneshot(tokenomy_api::app(s), req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        resp.into_body()
    };
    let until = |s: AppState, want: u64| async move {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while queued(s.clone()).await != want {
            assert!(std::time::Instant::now() < deadline, "the queue never held {want}");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    };
    let n3 = json!({"model": MODEL, "prompt": "Hi", "max_tokens": 1, "n": 3});
    let e = assert_error(&post(&s, "/v1/completions", n3).await, StatusCode::BAD_REQUEST);
    assert!(e["message"].as_str().unwrap().contains("--queue-max") && e["param"] == "n", "{e}");

    // One runs (its first token came, so it holds the slot), two wait: the queue is full.
    let mut running = stream(s.clone(), 2_000).await;
    running.frame().await.unwrap().unwrap();
    until(s.clone(), 0).await;
    let waiting = [stream(s.clone(), 4).await, stream(s.clone(), 4).await];
    until(s.clone(), 2).await;
    let r = post(&s, "/v1/completions", json!({"model": MODEL, "prompt": "Hi", "max_tokens": 1})).await;
    assert!(r.headers.contains_key("retry-after"));
    let e = assert_error(&r, StatusCode::TOO_MANY_REQUESTS);
    assert!(e["message"].as_str().unwrap().contains("2 of its 2 queue places"), "{e}");
    let n2 = post(&s, "/v1/completions", json!({"model": MODEL, "prompt": "Hi", "max_tokens": 1, "n": 2})).await;
    assert_error(&n2, StatusCode::TOO_MANY_REQUESTS);

    // Clients that leave while waiting give their places back; so does admission.
    drop(waiting);
    until(s.clone(), 0).await;
    let both = [stream(s.clone(), 4).await, stream(s.clone(), 4).await];
    until(s.clone(), 2).await;
    drop(running);
    for mut b in both {
        while let Some(frame) = b.frame().await {
            frame.unwrap();
        }
    }
    assert_eq!(queued(s.clone()).await, 0);
    let v = post(&s, "/v1/completions", json!({"model": MODEL, "prompt": "Hi", "max_tokens": 1, "n": 2})).await.json();
    assert_eq!(v["choices"].as_array().unwrap().len(), 2, "{v}");
    // A burst of a slot's and the queue's worth, arriving while the slot is free, is taken whole
    // (its first request used to hold a queue place until its admission, so the third got a 429).
    let one = || post(&s, "/v1/completions", json!({"model": MODEL, "prompt": "Hi", "max_tokens": 2}));
    let (a, b, c) = tokio::join!(one(), one(), one());
    assert_eq!([a.status, b.status, c.status], [StatusCode::OK; 3], "{} {} {}", a.text, b.text, c.text);
}
