//! HTTP tests of the OpenAI routes against the real engine and the real SmolLM2 model
//! (fetched by scripts/fetch-test-models.sh). Requests go through `app(state)` with `oneshot`.

mod batching;
mod billing;
mod chat;
mod completions;
mod embeddings;
mod errors;
mod reference;
mod responses;
mod tools;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tokenomy_api::{app, ApiConfig, AppState};
use tokenomy_engine::{Engine, ModelConfig};
use tower::ServiceExt;

pub const MODEL: &str = "smollm2";

pub fn models_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TOKENOMY_TEST_MODELS") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("TOKENOMY_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".tokenomy"));
    home.join("models")
}

pub fn smollm2_path() -> PathBuf {
    let p = models_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.is_file(), "{} is missing: run scripts/fetch-test-models.sh", p.display());
    p
}

pub fn engine_with(f: impl FnOnce(&mut ModelConfig)) -> Engine {
    let mut c = ModelConfig::new(MODEL, smollm2_path());
    c.threads = 2;
    c.slots = 4;
    c.ctx_tokens_max = Some(2048);
    f(&mut c);
    Engine::load(&[c]).expect("model loads")
}

/// One engine shared by every test of this binary (loading is the slow part).
pub fn shared_engine() -> Arc<Engine> {
    static ENGINE: OnceLock<Arc<Engine>> = OnceLock::new();
    ENGINE.get_or_init(|| Arc::new(engine_with(|_| {}))).clone()
}

pub fn state() -> AppState {
    AppState::new(shared_engine(), ApiConfig { body_bytes_max: 64 * 1024 })
}

/// A state with its own single-slot engine: for tests that compare outputs of several
/// requests, which must not be batched with other tests' sequences (batched kernels may
/// round differently, and a tiny model's greedy choice can flip on that).
pub fn solo_state() -> AppState {
    AppState::new(Arc::new(engine_with(|c| c.slots = 1)), ApiConfig { body_bytes_max: 64 * 1024 })
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: axum::http::HeaderMap,
    pub text: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }

    /// The `data:` payloads of an SSE body.
    pub fn sse_data(&self) -> Vec<String> {
        self.text.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_string).collect()
    }
}

pub async fn send(state: &AppState, method: &str, uri: &str, body: Option<&str>) -> Reply {
    request(state, method, uri, body, &[]).await
}

/// A request with extra headers (`authorization`, `idempotency-key`, …).
pub async fn request(state: &AppState, method: &str, uri: &str, body: Option<&str>, headers: &[(&str, &str)]) -> Reply {
    let mut req = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let req = req.body(body.map_or_else(Body::empty, |b| Body::from(b.to_string()))).unwrap();
    let resp = app(state.clone()).oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    Reply { status, headers, text: String::from_utf8(bytes.to_vec()).unwrap() }
}

pub async fn post(state: &AppState, uri: &str, body: Value) -> Reply {
    send(state, "POST", uri, Some(&body.to_string())).await
}

/// Asserts OpenAI's error shape and returns the error object.
pub fn assert_error(r: &Reply, status: StatusCode) -> Value {
    assert_eq!(r.status, status, "{}", r.text);
    let e = r.json()["error"].clone();
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{}", r.text);
    assert!(e["type"].is_string(), "{}", r.text);
    assert!(e.get("param").is_some() && e.get("code").is_some(), "{}", r.text);
    e
}

#[tokio::test]
async fn models_health_ready_metrics() {
    let s = state();
    let r = send(&s, "GET", "/v1/models", None).await;
    assert_eq!(r.status, StatusCode::OK);
    let m = r.json();
    assert_eq!(m["object"], "list");
    assert_eq!(m["data"][0]["id"], MODEL);
    assert_eq!(m["data"][0]["meta"]["architecture"], "llama");
    assert!(m["data"][0]["created"].as_u64().is_some_and(|t| t > 1_700_000_000), "a Unix time: {m}");
    // the file is hashed in the background after load; it shows up shortly
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let sha = send(&s, "GET", "/v1/models", None).await.json()["data"][0]["meta"]["sha256"].clone();
        if sha == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53" {
            break;
        }
        assert!(sha.is_null() && std::time::Instant::now() < deadline, "sha256 {sha}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(send(&s, "GET", "/v1/models/smollm2", None).await.status, StatusCode::OK);
    assert_error(&send(&s, "GET", "/v1/models/nope", None).await, StatusCode::NOT_FOUND);
    assert_eq!(send(&s, "GET", "/health", None).await.json()["status"], "ok");
    assert_eq!(send(&s, "GET", "/ready", None).await.status, StatusCode::OK);
    let metrics = send(&s, "GET", "/metrics", None).await.text;
    for name in ["tokenomy_queue_depth", "tokenomy_running_sequences", "tokenomy_kv_cells_reserved", "tokenomy_metered_completion_tokens_total"] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    assert_eq!(send(&s, "GET", "/nope", None).await.status, StatusCode::NOT_FOUND);
    let metrics = send(&s, "GET", "/metrics", None).await.text;
    for line in [r#"{route="/v1/models/{*id}",code="404"} 1"#, r#"{route="/health",code="200"} 1"#, r#"{route="other",code="404"} 1"#] {
        assert!(metrics.contains(&format!("tokenomy_http_responses_total{line}")), "{line} missing from:\n{metrics}");
    }
}

/// A gauge's value for the test model in a Prometheus text page.
fn gauge(page: &str, name: &str) -> Option<f64> {
    let prefix = format!("{name}{{model=\"{MODEL}\"}} ");
    page.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok())
}

#[tokio::test]
async fn gauges_return_to_zero_when_the_engine_goes_idle() {
    let s = solo_state();
    let r = post(&s, "/v1/completions", serde_json::json!({"model": MODEL, "prompt": "Hello", "max_tokens": 3})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    // The answer is sent when the job ends; the worker publishes as it goes idle, just after.
    let mut page = String::new();
    for _ in 0..100 {
        page = send(&s, "GET", "/metrics", None).await.text;
        if gauge(&page, "tokenomy_running_sequences") == Some(0.0) && gauge(&page, "tokenomy_queue_depth") == Some(0.0) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("an idle engine still reports work:\n{page}");
}
