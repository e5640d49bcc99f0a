//! tokenomy against llama.cpp's own server on the same GGUF: rendered chat prompt, prompt token
//! ids and greedy answers must match token for token (SmolLM2 and Qwen2.5-Coder). The reference files were recorded with
//! `bench/record_llama_server_reference.py` (see its "produced_by" field).
//!
//! Greedy answers depend on the CPU: llama.cpp is built for the machine it runs on, and its
//! AVX2 and AVX-512 kernels round differently, so llama-server itself answers differently on
//! the two (SmolLM2 in 4 of 4 chats, Qwen in 1 of 4). Each model therefore has one recording
//! per kind of CPU, and our answer (content, usage and finish reason together) must be
//! llama-server's on one of them. Prompts and token ids do not depend on the CPU: they must
//! match every recording.

use crate::*;
use serde_json::json;
use tokenomy_core::{Backend, ChatMessage};
use tokenomy_engine::{Engine, ModelConfig};

/// A model and the answers llama.cpp recorded for it, one recording per kind of CPU.
struct Reference {
    model: &'static str,
    file: &'static str,
    data: [&'static str; 2],
}

const REFERENCES: [Reference; 2] = [
    Reference {
        model: MODEL,
        file: "SmolLM2-135M-Instruct.Q4_1.gguf",
        data: [include_str!("../data/llama_server_smollm2.json"), include_str!("../data/llama_server_smollm2.avx512.json")],
    },
    Reference {
        model: "qwen2.5-coder-0.5b",
        file: "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        data: [
            include_str!("../data/llama_server_qwen2.5-coder.json"),
            include_str!("../data/llama_server_qwen2.5-coder.avx512.json"),
        ],
    },
];

impl Reference {
    /// The recordings (the first is the one prompts and texts are read from).
    fn json(&self) -> Vec<Value> {
        self.data.iter().map(|d| serde_json::from_str(d).expect("reference JSON parses")).collect()
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
        let recordings = r.json();
        let data = &recordings[0];
        for other in &recordings[1..] {
            assert_eq!(other["texts"], data["texts"], "{}: recordings disagree on token ids", r.model);
        }
        for case in data["texts"].as_array().unwrap() {
            let got = engine.tokenize(r.model, case["text"].as_str().unwrap(), true).unwrap();
            assert_eq!(got, ids(&case["token_ids"]), "{}: tokenization of {:?}", r.model, case["text"]);
        }
        let max_tokens = data["max_tokens"].as_u64().unwrap();
        for (i, case) in data["chats"].as_array().unwrap().iter().enumerate() {
            // A fresh engine per chat: llama-server ran with cache_prompt off, and a prompt
            // computed partly from the prefix cache may round differently in late tokens.
            let engine = r.engine();
            let s = AppState::new(engine.clone(), ApiConfig::default());
            let rendered = engine.render_chat(r.model, &messages(&case["messages"]), &[]).unwrap();
            let got = rendered.tokens.clone();
            assert_eq!(got, ids(&case["prompt_token_ids"]), "{}: prompt tokens differ\nours: {rendered:?}\ntheirs: {:?}", r.model, case["prompt"]);
            assert_eq!(got, engine.tokenize(r.model, &rendered.text, true).unwrap());
            let body = json!({"model": r.model, "messages": case["messages"], "temperature": 0, "max_tokens": max_tokens});
            let v = post(&s, "/v1/chat/completions", body).await.json();
            let answer = |content: &Value, usage: &Value, finish: &Value| {
                json!({"content": content, "prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"], "finish_reason": finish})
            };
            let ours = answer(&v["choices"][0]["message"]["content"], &v["usage"], &v["choices"][0]["finish_reason"]);
            let theirs: Vec<Value> = recordings
                .iter()
                .map(|rec| {
                    let c = &rec["chats"][i];
                    assert_eq!(c["prompt_token_ids"], case["prompt_token_ids"], "{}: recordings disagree on a prompt", r.model);
                    answer(&c["content"], &c["usage"], &c["finish_reason"])
                })
                .collect();
            assert!(theirs.contains(&ours), "{}: answer differs for {}\nours: {ours}\nllama-server's: {theirs:#?}", r.model, case["messages"]);
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

/// The engine cuts every prompt at special tokens itself (llama.cpp cannot be told to leave
/// some of them as text, and its own cut is quadratic in them). On texts without wrapped
/// spans that cut must give llama.cpp's own tokens: checked on the recorded texts and
/// prompts, on strings that stress the cut (adjacent and leading special tokens, spaces around
/// them, user-defined tokens, Unicode), for the three model families (BPE and SentencePiece).
#[test]
fn the_engines_own_cut_at_special_tokens_gives_llama_cpps_tokens() {
    let mut texts: Vec<String> = vec![
        "<|im_start|><|im_end|>".into(),
        "<|im_start|>user\n  Hi there  <|im_end|>\n<|im_start|>assistant\n".into(),
        " leading space then <|endoftext|> and trailing  ".into(),
        "<tool_call>\n{\"name\": \"f\"}\n</tool_call><|im_end|>".into(),
        "<bos><start_of_turn>user\nHé, 東京 ❤ <end_of_turn>\n<start_of_turn>model\n".into(),
        "no special tokens at all, just text\n\n\twith tabs".into(),
        "<|fim_prefix|>def f():<|fim_suffix|>\n<|fim_middle|>".into(),
        "<<|im_start|>>|im_end|>".into(),
        "<|im_start|><|im_start|>  <|im_end|><|im_end|>x<|endoftext|><|im_end|>".into(),
        "<start_of_turn><end_of_turn><start_of_turn>  \n\n  <end_of_turn>\n\n\n\n   \t<bos><eos>".into(),
        "<|im_start|>user\na<|im_end|>\n".repeat(300),
        format!("a{}b{}c\t\t\t{}", "\n".repeat(70), " ".repeat(70), "\n \n  ".repeat(20)),
        String::new(),
    ];
    for r in &REFERENCES {
        let data = &r.json()[0];
        texts.extend(data["texts"].as_array().unwrap().iter().map(|c| c["text"].as_str().unwrap().to_string()));
        texts.extend(data["chats"].as_array().unwrap().iter().map(|c| c["prompt"].as_str().unwrap().to_string()));
    }
    let models = [
        (MODEL, "SmolLM2-135M-Instruct.Q4_1.gguf"),
        ("qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"),
        ("gemma3-270m", "gemma-3-270m-q4_k_m.gguf"),
    ];
    for (name, file) in models {
        let path = models_dir().join(file);
        assert!(path.is_file(), "{} missing: run scripts/fetch-test-models.sh", path.display());
        let mut c = ModelConfig::new(name, path);
        c.slots = 1;
        c.ctx_tokens_max = Some(256);
        let engine = Engine::load(&[c]).expect("model loads");
        for text in &texts {
            let ours = engine.tokenize(name, text, true).unwrap();
            let theirs = engine.tokenize_by_llama_cpp(name, text).unwrap();
            assert_eq!(ours, theirs, "{name}: {text:?}");
        }
    }
}
