//! `/v1/embeddings` against the real SmolLM2: vectors equal to llama.cpp's own (recorded from
//! `llama-server --embeddings --pooling mean` by `bench/record_llama_server_embeddings.py`),
//! every input format OpenAI takes, bad input refused, and the charge with its receipt.

use axum::http::StatusCode;
use base64::Engine as _;
use serde_json::{json, Value};
use sha2::Digest;

use crate::billing::node;
use crate::{assert_error, post, state, MODEL};

const REFERENCE: &str = include_str!("../data/llama_server_embeddings_smollm2.json");

fn vector(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum()
}

fn from_base64(s: &str) -> Vec<f32> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(s).unwrap();
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

/// One request per text, then all texts in one request: each vector is llama.cpp's (the same
/// direction to within its rounding on another CPU), of unit length, with its token count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_are_llama_cpps_own() {
    let s = state();
    let reference: Value = serde_json::from_str(REFERENCE).unwrap();
    let texts = reference["texts"].as_array().unwrap();
    let mut singles = Vec::new();
    for t in texts {
        let r = post(&s, "/v1/embeddings", json!({"model": MODEL, "input": t["text"], "encoding_format": "float"})).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        let v = r.json();
        assert_eq!((v["object"].as_str(), v["model"].as_str(), v["data"][0]["object"].as_str()), (Some("list"), Some(MODEL), Some("embedding")));
        assert_eq!(v["usage"]["prompt_tokens"], t["prompt_tokens"], "{}", t["text"]);
        assert_eq!(v["usage"]["total_tokens"], t["prompt_tokens"]);
        let ours = vector(&v["data"][0]["embedding"]);
        let theirs = vector(&t["embedding"]);
        assert_eq!(ours.len(), theirs.len());
        assert!((dot(&ours, &ours) - 1.0).abs() < 1e-5, "unit length");
        let cos = dot(&ours, &theirs);
        assert!(cos > 0.999, "{}: cosine {cos} with llama.cpp's", t["text"]);
        singles.push(ours);
    }
    let all: Vec<&Value> = texts.iter().map(|t| &t["text"]).collect();
    let v = post(&s, "/v1/embeddings", json!({"model": MODEL, "input": all})).await.json();
    let total: u64 = texts.iter().map(|t| t["prompt_tokens"].as_u64().unwrap()).sum();
    assert_eq!(v["usage"]["prompt_tokens"], total);
    for (i, single) in singles.iter().enumerate() {
        assert_eq!(v["data"][i]["index"], i);
        assert_eq!(&vector(&v["data"][i]["embedding"]), single, "an input embeds the same alone or in a list");
    }
    // Token ids embed as their text does; `base64` is the same vector as little-endian float32s.
    let ids = &texts[0]["token_ids"];
    let v = post(&s, "/v1/embeddings", json!({"model": MODEL, "input": [ids, ids], "encoding_format": "base64"})).await.json();
    assert_eq!(from_base64(v["data"][1]["embedding"].as_str().unwrap()), singles[0]);
    assert_eq!(v["usage"]["prompt_tokens"], 2 * ids.as_array().unwrap().len());
    let native = post(&s, "/v1/embeddings", json!({"model": MODEL, "input": "x", "dimensions": singles[0].len()})).await;
    assert_eq!(native.status, StatusCode::OK, "{}", native.text);
}

#[tokio::test]
async fn bad_embedding_requests_are_refused_in_openai_shape() {
    let s = state();
    let long: Vec<u32> = vec![42; 1025];
    let cases = [
        (json!({"model": MODEL, "input": "x", "encoding_format": "hex"}), "encoding_format"),
        (json!({"model": MODEL, "input": "x", "dimensions": 0}), "dimensions"),
        (json!({"model": MODEL, "input": "x", "dimensions": 5}), "dimensions"),
        (json!({"model": MODEL, "input": []}), "input"),
        (json!({"model": MODEL, "input": [[]]}), "input"),
        (json!({"model": MODEL, "input": long}), "input"),
        (json!({"model": MODEL, "input": [1, 99_999_999]}), "input"),
        (json!({"model": MODEL, "input": vec!["x"; 2049]}), "input"),
        // One request may not hold the model's embedding thread for long: 17 inputs of 1024
        // tokens are refused before anything is held.
        (json!({"model": MODEL, "input": vec![vec![42u32; 1024]; 17]}), "input"),
    ];
    for (body, param) in cases {
        let e = assert_error(&post(&s, "/v1/embeddings", body.clone()).await, StatusCode::BAD_REQUEST);
        assert_eq!(e["param"], param, "{body}: {e}");
    }
    assert_error(&post(&s, "/v1/embeddings", json!({"model": "nope", "input": "x"})).await, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedding_is_charged_for_its_tokens_with_a_receipt() {
    let n = node(None, "", &[]).await;
    let (acc, key) = n.funded("embedder", 1_000_000).await;
    let (b0, _) = n.balance(&acc).await;
    let body = json!({"model": MODEL, "input": ["The cat sits on the mat.", "Quarterly revenue grew five percent."], "encoding_format": "base64"});
    let r = n.call("POST", "/v1/embeddings", Some(body), &key).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let v = r.json();
    let rid = r.headers["tokenomy-receipt"].to_str().unwrap();
    let amount = v["receipt"]["amount_micros"].as_i64().unwrap();
    assert!(amount > 0, "{v}");
    assert_eq!(n.balance(&acc).await, (b0 - amount, 0), "charged exactly the receipt");
    let bundle = n.call("GET", &format!("/v1/receipts/{rid}"), None, &key).await;
    let receipt = tokenomy_receipts::verify_bundle(&bundle.text, &n.key()).unwrap().receipt;
    assert_eq!((receipt.prompt_tokens, receipt.completion_tokens), (v["usage"]["prompt_tokens"].as_u64().unwrap(), 0));
    // The receipt's output hash is over the vectors as `base64` returned them.
    let returned: Vec<&str> = v["data"].as_array().unwrap().iter().map(|d| d["embedding"].as_str().unwrap()).collect();
    assert_eq!(receipt.output_sha256, <[u8; 32]>::from(sha2::Sha256::digest(serde_json::to_vec(&returned).unwrap())));
    // A request refused after the work (a length the model cannot give) is not charged.
    let refused = n.call("POST", "/v1/embeddings", Some(json!({"model": MODEL, "input": "x", "dimensions": 5})), &key).await;
    assert_error(&refused, StatusCode::BAD_REQUEST);
    assert_eq!(n.balance(&acc).await, (b0 - amount, 0));
    n.check().await;
}
