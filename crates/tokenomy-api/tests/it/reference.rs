//! tokenomy against llama.cpp's own server on the same GGUF: rendered chat prompt, prompt token
//! ids and greedy answers must match token for token (SmolLM2 and Qwen2.5-Coder). The reference files were recorded with
//! `bench/record_llama_server_reference.py` (see its "produced_by" field).

use crate::*;
use serde_json::json;
use tokenomy_core::{Backend, ChatMessage};
use tokenomy_engine::{Engine, ModelConfig};

/// A model and the answers llama.cpp recorded for it.
struct Reference {
    model: &'static str,
    file: &'static str,
    data: &'static str,
}

const REFERENCES: [Reference; 2] = [
    Reference { model: MODEL, file: "SmolLM2-135M-Instruct.Q4_1.gguf", data: include_str!("../data/llama_server_smollm2.json") },
    Reference {
        model: "qwen2.5-coder-0.5b",
        file: "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        data: include_str!("../data/llama_server_qwen2.5-coder.json"),
    },
];

impl Reference {
    fn json(&self) -> Value {
        serde_json::from_str(self.data).expect("reference JSON parses")
    }

    /// A single-slot engine for this model (see `solo_state`).
    fn engine(&self) -> Arc<Engine> {
        let path = models_dir().join(self.file);
        assert!(path.is_file(), "{} missing: run scripts/fetch-test-models.sh", path.display());
        let mut c = ModelConfig::new(self.model, path);
        c.threads = 2;
        c.slots = 1;
        c.ctx_tokens_max = Some(2048);
        Arc::new(Engine::load(&[c]).expect("model loads"))
    }
}

fn messages(v: &Value) -> Vec<ChatMessage> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|m| ChatMessage::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect()
}

fn ids(v: &Value) -> Vec<i32> {
    v.as_array().unwrap().iter().map(|t| t.as_i64().unwrap() as i32).collect()
}

#[tokio::test]
async fn prompts_token_ids_and_greedy_answers_match_llama_server() {
    for r in &REFERENCES {
        let engine = r.engine();
        let data = r.json();
        for case in data["texts"].as_array().unwrap() {
            let got = engine.tokenize(r.model, case["text"].as_str().unwrap(), true).unwrap();
            assert_eq!(got, ids(&case["token_ids"]), "{}: tokenization of {:?}", r.model, case["text"]);
        }
        let max_tokens = data["max_tokens"].as_u64().unwrap();
        for case in data["chats"].as_array().unwrap() {
            // A fresh engine per chat: llama-server ran with cache_prompt off, and a prompt
            // computed partly from the prefix cache may round differently in late tokens.
            let engine = r.engine();
            let s = AppState::new(engine.clone(), ApiConfig::default());
            let rendered = engine.render_chat(r.model, &messages(&case["messages"]), &[]).unwrap();
            let got = engine.tokenize(r.model, &rendered, true).unwrap();
            assert_eq!(got, ids(&case["prompt_token_ids"]), "{}: prompt tokens differ\nours: {rendered:?}\ntheirs: {:?}", r.model, case["prompt"]);
            let body = json!({"model": r.model, "messages": case["messages"], "temperature": 0, "max_tokens": max_tokens});
            let v = post(&s, "/v1/chat/completions", body).await.json();
            assert_eq!(v["choices"][0]["message"]["content"], case["content"], "{}: answer differs for {}", r.model, case["messages"]);
            assert_eq!(v["usage"]["prompt_tokens"], case["usage"]["prompt_tokens"], "{}", r.model);
            assert_eq!(v["usage"]["completion_tokens"], case["usage"]["completion_tokens"], "{}", r.model);
            assert_eq!(v["choices"][0]["finish_reason"], case["finish_reason"], "{}", r.model);
        }
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
