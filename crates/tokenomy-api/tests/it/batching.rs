//! Correctness and limits under continuous batching: the same text scored alone and batched
//! with seven others agrees on the top-1 token at ≥ 99 % of positions (teacher forcing;
//! measured figure printed), greedy answers and usage equal their solo runs; a burst of 200 requests against a small KV
//! budget ends every request with an answer or a 429, never exceeds the budget, and the node
//! keeps serving.

use std::sync::Arc;

use axum::http::StatusCode;
use serde_json::{json, Value};
use tokenomy_api::{ApiConfig, AppState};

use crate::{assert_error, engine_with, post, send, MODEL};

/// The top-1 token and its log-probability at every prompt position (teacher forcing through
/// echo + logprobs).
async fn top1(s: &AppState, text: &str) -> Vec<(String, f64)> {
    let v = post(s, "/v1/completions", json!({"model": MODEL, "prompt": text, "echo": true, "logprobs": 1, "max_tokens": 0})).await.json();
    v["choices"][0]["logprobs"]["top_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .skip(1) // the first token has no prediction
        .map(|m| {
            let m = m.as_object().unwrap();
            let (t, lp) = m.iter().max_by(|a, b| a.1.as_f64().unwrap().total_cmp(&b.1.as_f64().unwrap())).unwrap();
            (t.clone(), lp.as_f64().unwrap())
        })
        .collect()
}

fn passages() -> Vec<String> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/apache-2.0-excerpt.txt")).unwrap();
    let words: Vec<&str> = text.split_whitespace().collect();
    words.chunks(words.len() / 8).take(8).map(|c| c.join(" ")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_scoring_agrees_with_solo_scoring_under_teacher_forcing() {
    let texts = passages();
    let solo = AppState::new(Arc::new(engine_with(|c| c.slots = 1)), ApiConfig::default());
    let mut alone = Vec::new();
    for t in &texts {
        alone.push(top1(&solo, t).await);
    }
    let batched_state = AppState::new(Arc::new(engine_with(|c| c.slots = 8)), ApiConfig::default());
    let batched = futures::future::join_all(texts.iter().map(|t| top1(&batched_state, t))).await;
    let (mut same, mut exact, mut total) = (0usize, 0usize, 0usize);
    for (a, b) in alone.iter().zip(&batched) {
        assert_eq!(a.len(), b.len(), "the same text tokenizes the same");
        same += a.iter().zip(b).filter(|(x, y)| x.0 == y.0).count();
        exact += a.iter().zip(b).filter(|(x, y)| x == y).count();
        total += a.len();
    }
    let agreement = same as f64 / total as f64;
    eprintln!("teacher forcing: top-1 agreement {same}/{total} = {:.4}; log-probabilities equal at {exact}", agreement);
    // Issue 5: ≥ 99 %. Measured: 1601/1601, bit-identical log-probabilities (SmolLM2 Q4_1).
    // Each slot has its own KV stream, so a sequence's cells sit where they would alone, and
    // every prompt chunk is long enough for flash attention's tiled kernel (scheduler.rs,
    // PREFILL_CHUNK_MIN), as the solo run's is. With a unified cache it was 97.4 %.
    assert!(total > 1_000 && agreement >= 0.99, "{same}/{total}");

    // Greedy answers: the same text and usage alone and batched.
    let q = |i: usize| json!({"model": MODEL, "temperature": 0, "max_tokens": 24, "messages": [
        {"role": "system", "content": "You are a concise assistant."}, {"role": "user", "content": format!("Give one fact about the number {i}.")}]});
    let mut solo_answers = Vec::new();
    for i in 0..6 {
        solo_answers.push(post(&solo, "/v1/chat/completions", q(i)).await.json());
    }
    let together = futures::future::join_all((0..6).map(|i| post(&batched_state, "/v1/chat/completions", q(i)))).await;
    for (a, b) in solo_answers.iter().zip(together.iter().map(|r| r.json())) {
        assert_eq!(a["choices"][0]["message"]["content"], b["choices"][0]["message"]["content"]);
        // (cached_tokens may differ: the batched engine copies the system prompt's KV)
        for n in ["prompt_tokens", "completion_tokens", "total_tokens"] {
            assert_eq!(a["usage"][n], b["usage"][n], "{n}");
        }
    }
}

fn gauge(metrics: &str, name: &str) -> u64 {
    metrics.lines().find(|l| l.starts_with(name) && !l.starts_with('#')).and_then(|l| l.split_whitespace().last()).unwrap().parse::<f64>().unwrap() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_200_against_a_small_kv_budget_gets_answers_or_429s() {
    const KV_CELLS: u32 = 1_024;
    let s = AppState::new(
        Arc::new(engine_with(|c| {
            c.slots = 4;
            c.ctx_tokens_max = Some(256);
            c.kv_cells_max = Some(KV_CELLS);
            c.queue_max = 16;
        })),
        ApiConfig::default(),
    );
    let watcher = {
        let s = s.clone();
        tokio::spawn(async move {
            let mut peak = 0;
            for _ in 0..400 {
                let m = send(&s, "GET", "/metrics", None).await.text;
                peak = peak.max(gauge(&m, "tokenomy_kv_cells_reserved"));
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            peak
        })
    };
    let body = |i: usize| json!({"model": MODEL, "max_tokens": 8, "temperature": 0.7, "seed": i,
        "messages": [{"role": "user", "content": format!("Say something about {i}.")}]});
    let replies = futures::future::join_all((0..200).map(|i| post(&s, "/v1/chat/completions", body(i)))).await;
    let (mut ok, mut busy) = (0, 0);
    for r in &replies {
        match r.status {
            StatusCode::OK => {
                let v: Value = r.json();
                assert!(v["choices"][0]["message"]["content"].is_string());
                ok += 1;
            }
            StatusCode::TOO_MANY_REQUESTS => {
                assert!(r.headers.contains_key("retry-after"));
                assert_error(r, StatusCode::TOO_MANY_REQUESTS);
                busy += 1;
            }
            other => panic!("every request ends with an answer or a 429, got {other}: {}", r.text),
        }
    }
    eprintln!("burst: {ok} answered, {busy} got 429");
    assert!(ok >= 4 && ok + busy == 200);
    let peak = watcher.await.unwrap();
    assert!(peak <= u64::from(KV_CELLS), "KV cells reserved peaked at {peak} > {KV_CELLS}");
    // and it keeps serving
    assert_eq!(post(&s, "/v1/chat/completions", body(999)).await.status, StatusCode::OK);
}
