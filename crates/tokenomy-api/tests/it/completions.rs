use crate::*;
use serde_json::json;
use tokenomy_core::Backend;

#[tokio::test]
async fn prompt_as_string_list_and_token_ids() {
    let s = solo_state();
    let v = post(&s, "/v1/completions", json!({"model": MODEL, "prompt": ["The sky is", "Two plus two is"], "max_tokens": 4, "temperature": 0})).await.json();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"].as_array().unwrap().len(), 2);
    let ids = shared_engine().tokenize(MODEL, "The sky is", true).unwrap();
    let by_ids = post(&s, "/v1/completions", json!({"model": MODEL, "prompt": ids, "max_tokens": 4, "temperature": 0})).await.json();
    // the same prompt given as token ids is the same request (text may differ in late tokens:
    // batched decoding rounds differently, so compare the first word)
    let first_word = |v: &Value| v["choices"][0]["text"].as_str().unwrap().split_whitespace().next().map(str::to_string);
    assert_eq!(first_word(&by_ids), first_word(&v));
    assert_eq!(by_ids["usage"]["prompt_tokens"].as_u64().unwrap(), ids.len() as u64);
    let lists = post(&s, "/v1/completions", json!({"model": MODEL, "prompt": [ids.clone(), ids], "max_tokens": 2, "temperature": 0})).await.json();
    assert_eq!(lists["choices"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn echo_with_logprobs_and_zero_max_tokens_scores_the_prompt() {
    let s = state();
    let text = "The quick brown fox jumps over the lazy dog.";
    let n_tokens = shared_engine().tokenize(MODEL, text, true).unwrap().len();
    let v = post(&s, "/v1/completions", json!({"model": MODEL, "prompt": text, "max_tokens": 0, "echo": true, "logprobs": 1, "temperature": 0})).await.json();
    let c = &v["choices"][0];
    assert!(c["text"].as_str().unwrap().ends_with(text), "{}", c["text"]);
    let lp = &c["logprobs"];
    let token_logprobs = lp["token_logprobs"].as_array().unwrap();
    assert_eq!(token_logprobs.len(), n_tokens);
    assert!(token_logprobs[0].is_null());
    assert!(token_logprobs[1..].iter().all(|l| l.as_f64().unwrap() <= 0.0));
    let tokens = lp["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), n_tokens);
    assert!(tokens.iter().all(|t| t.as_str().is_some_and(|t| !t.is_empty())), "every prompt token has its text: {tokens:?}");
    assert_eq!(lp["top_logprobs"].as_array().unwrap().len(), n_tokens);
    // Each scored token is among its own top logprobs (OpenAI's legacy API: up to logprobs + 1).
    for ((t, l), top) in tokens.iter().zip(token_logprobs).zip(lp["top_logprobs"].as_array().unwrap()).skip(1) {
        let top = top.as_object().unwrap();
        assert!((1..=2).contains(&top.len()) && top.get(t.as_str().unwrap()) == Some(l), "{t} {l} {top:?}");
    }
    assert_eq!(lp["text_offset"].as_array().unwrap().len(), n_tokens);
    assert_eq!(v["usage"]["completion_tokens"], 0);
    assert_eq!(v["usage"]["prompt_tokens"].as_u64().unwrap(), n_tokens as u64);
}

#[tokio::test]
async fn streamed_completion_matches_plain() {
    let s = solo_state();
    let body = json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 10, "temperature": 0});
    let plain = post(&s, "/v1/completions", body.clone()).await.json();
    let mut sb = body;
    sb["stream"] = json!(true);
    sb["stream_options"] = json!({"include_usage": true});
    let r = post(&s, "/v1/completions", sb).await;
    let data = r.sse_data();
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
    assert_eq!(text, plain["choices"][0]["text"].as_str().unwrap());
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], plain["usage"]["completion_tokens"]);
}

/// Echo + logprobs with generated tokens: one entry per prompt token, then one per generated
/// token, whose texts join into the answer's text at their offsets (lm-eval / HELM scoring);
/// streamed, the echoed prompt's chunk carries the prompt's logprobs.
#[tokio::test]
async fn echo_with_logprobs_and_generated_tokens_covers_prompt_and_answer() {
    let s = solo_state();
    let text = "Seven apples fell from the trees";
    let n_prompt = shared_engine().tokenize(MODEL, text, true).unwrap().len();
    let body = json!({"model": MODEL, "prompt": text, "max_tokens": 3, "echo": true, "logprobs": 1, "temperature": 0, "ignore_eos": true});
    let v = post(&s, "/v1/completions", body.clone()).await.json();
    let (full, lp) = (v["choices"][0]["text"].as_str().unwrap(), &v["choices"][0]["logprobs"]);
    let tokens: Vec<&str> = lp["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(tokens.len(), n_prompt + 3, "{tokens:?}");
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), n_prompt + 3);
    assert!(lp["token_logprobs"][0].is_null() && lp["token_logprobs"][1].is_f64());
    let offsets: Vec<usize> = lp["text_offset"].as_array().unwrap().iter().map(|o| o.as_u64().unwrap() as usize).collect();
    let chars: Vec<char> = full.chars().collect();
    for (t, o) in tokens.iter().zip(&offsets).skip(1) {
        assert_eq!(chars[*o..*o + t.chars().count()].iter().collect::<String>(), *t, "token {t:?} at offset {o} of {full:?}");
    }
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let data = post(&s, "/v1/completions", streamed).await.sse_data();
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    let echo = &chunks[0]["choices"][0];
    assert!(echo["text"].as_str().unwrap().ends_with(text), "{echo}");
    assert_eq!(echo["logprobs"]["tokens"].as_array().unwrap().len(), n_prompt);
    let joined: String = chunks.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
    assert_eq!(joined, full);
}
