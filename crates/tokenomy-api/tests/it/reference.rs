//! tokenomy against llama.cpp's own server on the same GGUF: rendered chat prompt, prompt token
//! ids and greedy answers must match token for token. The reference file was recorded with
//! `bench/record_llama_server_reference.py` (see its "produced_by" field).

use crate::*;
use serde_json::json;
use tokenomy_core::{Backend, ChatMessage};

fn reference() -> Value {
    let text = include_str!("../data/llama_server_smollm2.json");
    serde_json::from_str(text).expect("reference JSON parses")
}

fn messages(v: &Value) -> Vec<ChatMessage> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|m| ChatMessage { role: m["role"].as_str().unwrap().into(), content: m["content"].as_str().unwrap().into() })
        .collect()
}

#[test]
fn chat_prompts_and_token_ids_match_llama_server() {
    let engine = shared_engine();
    for case in reference()["chats"].as_array().unwrap() {
        let rendered = engine.render_chat(MODEL, &messages(&case["messages"])).unwrap();
        // llama-server's /apply-template output may still carry the BOS text that its
        // tokenizer then skips; compare what is tokenized.
        let ids = engine.tokenize(MODEL, &rendered, true).unwrap();
        let want: Vec<i32> = case["prompt_token_ids"].as_array().unwrap().iter().map(|t| t.as_i64().unwrap() as i32).collect();
        assert_eq!(ids, want, "prompt tokens differ for {}\nours: {rendered:?}\ntheirs: {:?}", case["messages"], case["prompt"]);
        assert_eq!(ids.len() as u64, case["usage"]["prompt_tokens"].as_u64().unwrap());
    }
    for case in reference()["texts"].as_array().unwrap() {
        let ids = engine.tokenize(MODEL, case["text"].as_str().unwrap(), true).unwrap();
        let want: Vec<i32> = case["token_ids"].as_array().unwrap().iter().map(|t| t.as_i64().unwrap() as i32).collect();
        assert_eq!(ids, want, "tokenization of {:?}", case["text"]);
    }
}

#[tokio::test]
async fn greedy_answers_match_llama_server_token_for_token() {
    let s = solo_state();
    let r = reference();
    let max_tokens = r["max_tokens"].as_u64().unwrap();
    for case in r["chats"].as_array().unwrap() {
        let body = json!({"model": MODEL, "messages": case["messages"], "temperature": 0, "max_tokens": max_tokens});
        let v = post(&s, "/v1/chat/completions", body).await.json();
        assert_eq!(v["choices"][0]["message"]["content"], case["content"], "answer differs for {}", case["messages"]);
        assert_eq!(v["usage"]["prompt_tokens"], case["usage"]["prompt_tokens"]);
        assert_eq!(v["usage"]["completion_tokens"], case["usage"]["completion_tokens"]);
        assert_eq!(v["choices"][0]["finish_reason"], case["finish_reason"]);
    }
}

/// Perplexity of a text computed through `/v1/completions` (echo + logprobs + max_tokens 0),
/// the way `llama-perplexity` computes it: chunks of `n_ctx` tokens, each starting with BOS,
/// scoring the second half of every chunk. Must agree with the recorded llama-perplexity
/// figure within 1 %.
#[tokio::test]
async fn perplexity_through_echo_logprobs_matches_llama_perplexity() {
    let reference: Value = serde_json::from_str(include_str!("../data/perplexity_smollm2.json")).unwrap();
    let n_ctx = reference["n_ctx"].as_u64().unwrap() as usize;
    let text = include_str!("../data/apache-2.0-excerpt.txt");
    let s = state();
    let engine = shared_engine();
    let tokens = engine.tokenize(MODEL, text, true).unwrap();
    let bos = tokens[0];
    let first = n_ctx / 2;
    let (mut nll, mut count) = (0.0f64, 0usize);
    for chunk in tokens.chunks_exact(n_ctx) {
        let mut ids = chunk.to_vec();
        ids[0] = bos;
        let v = post(&s, "/v1/completions", json!({"model": MODEL, "prompt": ids, "max_tokens": 0, "echo": true, "logprobs": 0})).await.json();
        let lps = v["choices"][0]["logprobs"]["token_logprobs"].as_array().unwrap().clone();
        assert_eq!(lps.len(), n_ctx);
        for lp in &lps[first + 1..] {
            nll -= lp.as_f64().unwrap();
            count += 1;
        }
    }
    let ppl = (nll / count as f64).exp();
    let want = reference["ppl"].as_f64().unwrap();
    let rel = (ppl - want).abs() / want;
    eprintln!("perplexity {ppl:.4} vs llama-perplexity {want:.4} ({:.3} % apart)", rel * 100.0);
    assert!(rel < 0.01, "perplexity {ppl:.4} vs llama-perplexity {want:.4} ({:.2} % apart)", rel * 100.0);
}
