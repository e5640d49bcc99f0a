//! Chat completions (and text completions and embeddings) served by an upstream
//! (`tokenomy-upstream`): held, forwarded, metered on the usage the upstream reports, settled
//! with a receipt, as a local answer is.
//!
//! The request is forwarded as the client sent it (after the same validation as a local one),
//! with the model renamed to the upstream's and, when the client set no limit, `max_tokens`
//! set to [`COMPLETION_TOKENS_DEFAULT`] (16, the API's own default, for a text completion),
//! so that the hold bounds what the upstream may produce. The prompt is held at one token per byte of the body, an upper bound for any
//! tokenizer that covers at least a byte per token; the settlement charges what the upstream
//! counted.
//!
//! Architecture Invariant: a proxied stream is read to its end by a task of its own, so the
//! upstream's usage (its last chunk, asked for with `stream_options.include_usage`) is read and
//! charged even when the client has left.

use std::time::Instant;

use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokenomy_billing::ReceiptRef;
use tokenomy_core::Usage;
use tokenomy_upstream::{usage_of, ChunkStream, Route, UpstreamError, UpstreamUsage};
use tokio::sync::mpsc;

use crate::routes::{begin_charge, billed_headers, receipt_of, sse, void_charge, Charge, Gate};
use crate::{AppError, AppState};

/// `max_tokens` for a proxied request that names no limit.
pub const COMPLETION_TOKENS_DEFAULT: u64 = 4096;

/// Prompt tokens a chat template may add to a proxied request's body, past one token per byte
/// of it: its role markers, its default system prompt, tools rendered with their instructions
/// (SmolLM2's template adds 5 to a 131-byte body with one tool; Hermes-style tool prompts a few
/// hundred). The hold covers them, so an honest upstream's count is not cut.
pub const PROXIED_TEMPLATE_TOKENS_MAX: u64 = 2048;

/// Chunks a proxied stream may have waiting for a slow client.
const STREAM_CHUNKS_QUEUED_MAX: usize = 64;

/// Which generation endpoint a proxied request is: its path upstream, its ids and where its
/// choices' texts are differ; holding, failover and settling do not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    /// `/v1/chat/completions` (and the Messages and Responses APIs, translated to it).
    Chat,
    /// `/v1/completions`.
    Completion,
}

impl Endpoint {
    fn id_prefix(self) -> &'static str {
        match self {
            Endpoint::Chat => "chatcmpl-",
            Endpoint::Completion => "cmpl-",
        }
    }

    fn chunk_object(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completion => "text_completion",
        }
    }

    /// Where a choice's text is: in a whole answer's choice, and in a stream chunk's.
    fn text_pointers(self) -> (&'static str, &'static str) {
        match self {
            Endpoint::Chat => ("/message/content", "/delta/content"),
            Endpoint::Completion => ("/text", "/text"),
        }
    }

    /// `max_tokens` when the client names none.
    fn max_tokens_default(self) -> u64 {
        match self {
            Endpoint::Chat => COMPLETION_TOKENS_DEFAULT,
            Endpoint::Completion => crate::routes::TEXT_COMPLETION_TOKENS_DEFAULT,
        }
    }
}

/// Whether a request for `model` with `n` choices goes to an upstream: one serves it, and
/// either no local model has that name or the local one's queue is full (it would be refused
/// with a 429: it overflows to the upstreams instead).
pub(crate) fn routes_here(state: &AppState, model: &str, n: u32) -> bool {
    if !state.upstreams.as_ref().is_some_and(|u| u.serves(model)) {
        return false;
    }
    let local = state.backend.models().iter().any(|m| m.name == model);
    !local || !state.backend.has_room(model, n.max(1) as usize)
}

/// Whether a local refusal `e` of a request for `model` lets an upstream take it: the engine's
/// queue was full (`overloaded`) and an upstream serves the model.
pub(crate) fn overflows_model(state: &AppState, e: &AppError, model: &str) -> bool {
    e.code == Some("overloaded") && state.upstreams.as_ref().is_some_and(|u| u.serves(model))
}

/// [`overflows_model`] for a chat request's JSON (`raw`).
pub(crate) fn overflows(state: &AppState, e: &AppError, raw: &[u8]) -> bool {
    let model = serde_json::from_slice::<Value>(raw).ok().and_then(|v| v["model"].as_str().map(str::to_string));
    model.is_some_and(|m| overflows_model(state, e, &m))
}

/// Whether only an upstream serves `model` (no local model has its name).
pub(crate) fn upstream_only(state: &AppState, model: &str) -> bool {
    state.upstreams.as_ref().is_some_and(|u| u.serves(model)) && !state.backend.models().iter().any(|m| m.name == model)
}

/// Refuses, for an endpoint that is not forwarded (the token counters), a model
/// that only an upstream serves, saying so rather than "no such model".
pub(crate) fn not_forwarded(state: &AppState, model: &str, endpoint: &str) -> Result<(), AppError> {
    match upstream_only(state, model) {
        true => Err(AppError::invalid_value("model", format!("`{model}` is served through an upstream, and this node forwards generations and embeddings to upstreams (/v1/chat/completions, /v1/completions, /v1/embeddings, and /v1/messages and /v1/responses as chats), not {endpoint}"))),
        false => Ok(()),
    }
}

/// What one proxied request needs past its gate.
struct Proxied {
    endpoint: Endpoint,
    model: String,
    request_id: String,
    body: Value,
    stream: bool,
    include_usage: bool,
    charge: Option<Charge>,
    /// The bounds the hold was placed for: usage an upstream reports past them is cut to them.
    prompt_tokens_max: u64,
    completion_tokens_max: u64,
}

/// A request's body as it is forwarded, and what the hold and the answer need of it.
struct Prepared {
    body: Value,
    /// What every choice may produce together: `max_tokens` (4096 if the client set none) × `n`
    /// (× the prompts, for a text completion of several).
    completion_tokens_max: u64,
    stream: bool,
    /// Whether the client asked for the usage chunk (it is always asked of the upstream).
    include_usage: bool,
}

fn prepare(raw: &[u8], endpoint: Endpoint) -> Result<Prepared, AppError> {
    let mut body: Value = serde_json::from_slice(raw).map_err(|e| AppError::invalid(format!("The request body is not valid JSON: {e}"), None))?;
    let n = body.get("n").and_then(Value::as_u64).unwrap_or(1).max(1);
    let named = ["max_completion_tokens", "max_tokens"].into_iter().find(|k| body.get(*k).is_some_and(|v| !v.is_null()));
    let limit = match named {
        Some(k) => Some(body[k].as_u64().ok_or_else(|| AppError::invalid_value(k, format!("{k} must be a non-negative integer, got {}", body[k])))?),
        None => None,
    };
    // A text completion may ask for none, to have its prompt echoed (with its logprobs).
    let echoed = endpoint == Endpoint::Completion && body.get("echo") == Some(&json!(true));
    if limit == Some(0) && !echoed {
        let k = named.unwrap_or("max_tokens");
        return Err(AppError::invalid_value(k, format!("{k} must be at least 1")));
    }
    let per_choice = limit.unwrap_or_else(|| {
        body["max_tokens"] = json!(endpoint.max_tokens_default());
        endpoint.max_tokens_default()
    });
    let choices = n.saturating_mul(prompts_in(&body));
    let stream = body.get("stream").and_then(Value::as_bool) == Some(true);
    let include_usage = body.pointer("/stream_options/include_usage").and_then(Value::as_bool) == Some(true);
    if stream {
        body["stream_options"] = json!({"include_usage": true});
    }
    Ok(Prepared { body, completion_tokens_max: per_choice.saturating_mul(choices), stream, include_usage })
}

/// How many prompts a request has: a text completion's `prompt` may be a list of them (texts,
/// or token lists), each given `n` choices; a list of numbers is one prompt, as tokens.
fn prompts_in(body: &Value) -> u64 {
    match body.get("prompt").and_then(Value::as_array) {
        Some(a) if !a.iter().all(Value::is_number) => a.len() as u64,
        _ => 1,
    }
}

/// A proxied answer, in OpenAI's chat shape: the HTTP layer renders it for its API (chat
/// completions as is; the Messages and Responses APIs translate it as they do a local one).
pub(crate) enum ProxyAnswer {
    /// A chat completion, settled, with this node's `receipt`.
    Whole(Value),
    /// Chat completion chunks; the last carries the usage and `receipt` (when asked for).
    Stream(tokio_stream::wrappers::ReceiverStream<Value>),
}

/// Who answered a proxied request and what it was charged under: its response's headers.
pub(crate) struct Billed {
    pub(crate) request_id: String,
    receipt_id: Option<String>,
    upstream: String,
}

impl Billed {
    /// The headers every proxied answer carries: the billed ones and `tokenomy-upstream`.
    pub(crate) async fn respond(&self, state: &AppState, g: &Gate, mut resp: Response) -> Response {
        if let Ok(v) = HeaderValue::from_str(&self.upstream) {
            resp.headers_mut().insert("tokenomy-upstream", v);
        }
        billed_headers(resp, &self.request_id, self.receipt_id.as_deref(), &g.allowance_now(state).await)
    }
}

/// `POST /v1/chat/completions` (or, as `endpoint` says, `/v1/completions`) for a model served
/// upstream.
pub(crate) async fn chat(state: &AppState, g: &Gate, raw: bytes::Bytes, request_sha256: [u8; 32], endpoint: Endpoint) -> Result<Response, AppError> {
    let (answer, billed) = run(state, g, raw, request_sha256, endpoint).await?;
    let resp = match answer {
        ProxyAnswer::Whole(v) => Json(v).into_response(),
        ProxyAnswer::Stream(s) => sse(s).into_response(),
    };
    Ok(billed.respond(state, g, resp).await)
}

/// Holds, forwards to the first upstream that answers, and settles: `raw` is a chat
/// completion request's JSON (the client's, or its translation from another API), or a text
/// completion's.
pub(crate) async fn run(state: &AppState, g: &Gate, raw: bytes::Bytes, request_sha256: [u8; 32], endpoint: Endpoint) -> Result<(ProxyAnswer, Billed), AppError> {
    let Prepared { body, completion_tokens_max, stream, include_usage } = prepare(&raw, endpoint)?;
    let model = body["model"].as_str().unwrap_or_default().to_string();
    let request_id = uuid::Uuid::new_v4().simple().to_string();
    let prompt_tokens_max = (raw.len() as u64).saturating_add(PROXIED_TEMPLATE_TOKENS_MAX);
    let charge = begin_charge(state, g, &request_id, &model, prompt_tokens_max, completion_tokens_max, request_sha256).await?;
    let p = Proxied { endpoint, model, request_id, body, stream, include_usage, charge, prompt_tokens_max, completion_tokens_max };
    // The upstream is asked, and its answer settled, on a task of its own: a client that
    // leaves does not cancel it, so what the upstream produced (and charged this node for) is
    // charged to the client, and the hold never waits out its timeout.
    let st = state.clone();
    let task = state.tasks.spawn(async move { forward(&st, p).await });
    task.await.map_err(|e| AppError::internal(format!("the proxied request's task failed: {e}")))?
}

/// Tries the upstreams in route order until one answers; settles (or, for a stream, starts
/// the task that settles) on its usage.
async fn forward(state: &AppState, p: Proxied) -> Result<(ProxyAnswer, Billed), AppError> {
    let (body, stream, endpoint) = (&p.body, p.stream, p.endpoint);
    let asked = first_answer(state, &p.model, &p.request_id, |route| {
        let mut forwarded = body.clone();
        forwarded["model"] = json!(route.upstream_model);
        async move {
            let provider = &route.upstream.provider;
            match (endpoint, stream) {
                (Endpoint::Chat, true) => provider.chat_stream(&forwarded).await.map(Answer::Stream),
                (Endpoint::Completion, true) => provider.completion_stream(&forwarded).await.map(Answer::Stream),
                (Endpoint::Chat, false) => provider.chat(&forwarded).await.and_then(|v| answer_of(&route, v, "choices")).map(Answer::Whole),
                (Endpoint::Completion, false) => provider.completion(&forwarded).await.and_then(|v| answer_of(&route, v, "choices")).map(Answer::Whole),
            }
        }
    })
    .await;
    match asked {
        Ok((route, a)) => {
            let upstream = route.upstream.name().to_string();
            let (answer, request_id, receipt_id) = match a {
                Answer::Whole(v) => whole(state, p, &route, v).await,
                Answer::Stream(chunks) => streamed(state, p, route, chunks),
            };
            Ok((answer, Billed { request_id, receipt_id, upstream }))
        }
        Err(last) => Err(unanswered(state, p.charge, &p.model, p.request_id, last).await),
    }
}

/// Asks the routes of `model` in order (`ask` asks one) until one answers: that route and its
/// answer, or the last failure. A failure that is the request's own fault (a `400`) ends the
/// search: every other upstream would refuse it too.
async fn first_answer<T, F, Fut>(state: &AppState, model: &str, request_id: &str, mut ask: F) -> Result<(Route, T), Option<UpstreamError>>
where
    F: FnMut(Route) -> Fut,
    Fut: std::future::Future<Output = Result<T, UpstreamError>>,
{
    let routes = state.upstreams.as_ref().map(|u| u.routes(model)).unwrap_or_default();
    let mut last = None;
    for route in routes {
        let started = Instant::now();
        route.upstream.requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match ask(route.clone()).await {
            Ok(a) => {
                route.upstream.observe_ttfb(started.elapsed().as_millis() as u64);
                route.upstream.record_success();
                return Ok((route, a));
            }
            Err(e) => {
                let retry = e.retryable();
                tracing::warn!(request_id, upstream = route.upstream.name(), error = %e, "upstream failed");
                if retry {
                    route.upstream.failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    route.upstream.record_failure();
                }
                last = Some(e);
                if !retry {
                    break;
                }
            }
        }
    }
    Err(last)
}

/// No upstream answered: the hold is voided, and the client told why (with the request id the
/// node's log names the failures under).
async fn unanswered(state: &AppState, charge: Option<Charge>, model: &str, request_id: String, last: Option<UpstreamError>) -> AppError {
    void_charge(state, charge).await;
    let e = last.map_or_else(|| AppError::internal(format!("no upstream serves {model}")), refused);
    AppError { request_id: Some(request_id), ..e }
}

/// `POST /v1/embeddings` for a model served upstream: held at one token per byte of the body
/// (and [`PROXIED_TEMPLATE_TOKENS_MAX`], for the special tokens a model adds to each input),
/// forwarded with the model renamed, and charged the prompt tokens the upstream reports, with
/// a receipt whose output hash covers the vectors as `base64` gives them, as a local one's does.
pub(crate) async fn embeddings(state: &AppState, g: &Gate, raw: bytes::Bytes, request_sha256: [u8; 32]) -> Result<Response, AppError> {
    let body: Value = serde_json::from_slice(&raw).map_err(|e| AppError::invalid(format!("The request body is not valid JSON: {e}"), None))?;
    let model = body["model"].as_str().unwrap_or_default().to_string();
    let request_id = uuid::Uuid::new_v4().simple().to_string();
    let prompt_tokens_max = (raw.len() as u64).saturating_add(PROXIED_TEMPLATE_TOKENS_MAX);
    let charge = begin_charge(state, g, &request_id, &model, prompt_tokens_max, 0, request_sha256).await?;
    let st = state.clone();
    // On a task of its own, as a chat is: a client that leaves is charged what was embedded.
    let task = state.tasks.spawn(async move {
        let asked = first_answer(&st, &model, &request_id, |route| {
            let mut forwarded = body.clone();
            forwarded["model"] = json!(route.upstream_model);
            async move { route.upstream.provider.embeddings(&forwarded).await.and_then(|v| answer_of(&route, v, "data")) }
        })
        .await;
        let (route, mut v) = match asked {
            Ok(answer) => answer,
            Err(last) => return Err(unanswered(&st, charge, &model, request_id, last).await),
        };
        log_upstream_receipt(&request_id, &route, &v);
        v.as_object_mut().map(|o| o.remove("receipt"));
        let vectors = base64_vectors(&v);
        let usage = tokenomy_upstream::embedding_usage_of(&v);
        let (receipt, pending, charged) = settle(&st, charge, &request_id, &model, &route, usage, (prompt_tokens_max, 0), &vectors).await;
        let u = charged.unwrap_or_default();
        v["usage"] = json!({"prompt_tokens": u.prompt_tokens, "total_tokens": u.prompt_tokens});
        v["model"] = json!(model);
        let receipt = receipt_of(receipt.as_ref(), pending.as_ref());
        if let Some((r, _)) = &receipt {
            v["receipt"] = r.clone();
        }
        let upstream = route.upstream.name().to_string();
        Ok((v, Billed { request_id, receipt_id: receipt.map(|(_, id)| id), upstream }))
    });
    let (v, billed) = task.await.map_err(|e| AppError::internal(format!("the proxied request's task failed: {e}")))??;
    Ok(billed.respond(state, g, Json(v).into_response()).await)
}

/// Each vector of an embeddings answer as `base64` gives it (little-endian float32s), whichever
/// encoding the upstream answered in: what the receipt's output hash covers.
fn base64_vectors(v: &Value) -> Vec<String> {
    let vector = |e: &Value| match e {
        Value::String(s) => s.clone(),
        e => {
            let floats: Vec<f32> = e.as_array().into_iter().flatten().map(|x| x.as_f64().unwrap_or(f64::NAN) as f32).collect();
            crate::embeddings::base64_of(&floats)
        }
    };
    v["data"].as_array().into_iter().flatten().map(|d| vector(&d["embedding"])).collect()
}

/// A whole answer that is one: `200` with an `error` object, or without its `list` (a chat's
/// `choices`, embeddings' `data`), is the upstream failing (and the next upstream is tried),
/// not an answer to pass on uncharged.
fn answer_of(route: &Route, v: Value, list: &str) -> Result<Value, UpstreamError> {
    if v[list].is_array() && v.get("error").is_none_or(Value::is_null) {
        return Ok(v);
    }
    let detail = match v.pointer("/error/message").and_then(Value::as_str) {
        Some(m) => format!("an error in a 200 answer: {m}"),
        None => format!("a 200 answer without {list}"),
    };
    Err(UpstreamError::Protocol { upstream: route.upstream.name().into(), detail })
}

enum Answer {
    Whole(Value),
    Stream(ChunkStream),
}

/// A whole answer: settled before it is sent, with its receipt in the body.
async fn whole(state: &AppState, p: Proxied, route: &Route, mut v: Value) -> (ProxyAnswer, String, Option<String>) {
    let texts = choice_texts(&v, p.endpoint.text_pointers().0);
    let usage = usage_of(&v);
    log_upstream_receipt(&p.request_id, route, &v);
    v.as_object_mut().map(|o| o.remove("receipt")); // the upstream's, not the client's
    let (receipt, pending, charged) = settle(state, p.charge, &p.request_id, &p.model, route, usage, (p.prompt_tokens_max, p.completion_tokens_max), &texts).await;
    // What was charged, should the upstream's have been cut; nothing when it was unreadable
    // (missing, negative, not a number), as a stream's usage chunk says then too.
    v["usage"] = usage_json(charged.unwrap_or_default());
    v["id"] = json!(format!("{}{}", p.endpoint.id_prefix(), p.request_id));
    v["model"] = json!(p.model);
    let receipt = receipt_of(receipt.as_ref(), pending.as_ref());
    if let Some((r, _)) = &receipt {
        v["receipt"] = r.clone();
    }
    (ProxyAnswer::Whole(v), p.request_id, receipt.map(|(_, id)| id))
}

/// A stream: a task reads the upstream to its end (whether or not the client stays), renames
/// each chunk, and settles on the usage of the last one, which it sends (if the client asked
/// for usage) with the receipt.
fn streamed(state: &AppState, p: Proxied, route: Route, mut chunks: ChunkStream) -> (ProxyAnswer, String, Option<String>) {
    let (tx, rx) = mpsc::channel::<Value>(STREAM_CHUNKS_QUEUED_MAX);
    let receipt_id = p.charge.as_ref().map(|c| c.hold.receipt_id.clone());
    let request_id = p.request_id.clone();
    let st = state.clone();
    state.tasks.spawn(async move {
        let id = format!("{}{}", p.endpoint.id_prefix(), p.request_id);
        let (mut client, mut texts, mut usage, mut last_chunk, mut failed) = (Some(tx), Vec::<String>::new(), None, None, None);
        while let Some(item) = chunks.next().await {
            let mut chunk = match item {
                Ok(c) => c,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            };
            chunk["id"] = json!(id);
            chunk["model"] = json!(p.model);
            if let Some(u) = usage_of(&chunk) {
                usage = Some(u);
                log_upstream_receipt(&p.request_id, &route, &chunk);
                chunk.as_object_mut().map(|o| (o.remove("usage"), o.remove("receipt")));
                last_chunk = Some(chunk.clone());
                if chunk["choices"].as_array().is_none_or(Vec::is_empty) {
                    continue;
                }
            }
            collect_deltas(&chunk, &mut texts, p.endpoint.text_pointers().1);
            if let Some(t) = &client {
                if t.send(chunk).await.is_err() {
                    client = None; // The client left; the upstream is read on, for its usage.
                }
            }
        }
        // (A stream that ends without its usage was delivered whole: it is not charged, and
        // `settle` logs it, as for a whole answer.)
        let (receipt, pending, charged) = settle(&st, p.charge, &p.request_id, &p.model, &route, usage, (p.prompt_tokens_max, p.completion_tokens_max), &texts).await;
        let Some(t) = client else { return };
        if let Some(e) = failed.filter(|_| receipt.is_none() && pending.is_none()) {
            tracing::warn!(request_id = %p.request_id, upstream = route.upstream.name(), error = %e, "a proxied stream failed");
            let message = format!("upstream {} failed during the answer; nothing was charged", route.upstream.name());
            let _ = t.send(json!({"error": {"message": message, "type": "server_error", "param": null, "code": "upstream_error"}})).await;
            return;
        }
        if p.include_usage {
            let mut last = last_chunk.unwrap_or_else(|| json!({"id": id, "object": p.endpoint.chunk_object(), "model": p.model}));
            last["choices"] = json!([]);
            last["usage"] = usage_json(charged.unwrap_or_default());
            if let Some((r, _)) = receipt_of(receipt.as_ref(), pending.as_ref()) {
                last["receipt"] = r;
            }
            let _ = t.send(last).await;
        }
    });
    (ProxyAnswer::Stream(tokio_stream::wrappers::ReceiverStream::new(rx)), request_id, receipt_id)
}

/// Usage as the client is shown it: what it was charged for.
fn usage_json(u: Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
        "total_tokens": u64::from(u.prompt_tokens) + u64::from(u.completion_tokens),
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
    })
}

/// Links this node's charge to the upstream's own, when the upstream (a tokenomy node) sent
/// a receipt: an operator checking what an upstream charged finds the request it served.
fn log_upstream_receipt(request_id: &str, route: &Route, v: &Value) {
    if let Some(theirs) = v.pointer("/receipt/id").and_then(Value::as_str) {
        tracing::info!(request_id, upstream = route.upstream.name(), upstream_receipt = theirs, "upstream receipt");
    }
}

/// Each choice's content (at `text` in the choice), by index, from a whole answer.
fn choice_texts(v: &Value, text: &str) -> Vec<String> {
    let mut texts = Vec::new();
    for c in v["choices"].as_array().into_iter().flatten() {
        let i = c["index"].as_u64().unwrap_or(texts.len() as u64) as usize;
        if i >= texts.len() {
            texts.resize(i.min(1024) + 1, String::new());
        }
        if let (Some(t), Some(s)) = (texts.get_mut(i), c.pointer(text).and_then(Value::as_str)) {
            t.push_str(s);
        }
    }
    texts
}

/// Appends a stream chunk's content deltas (at `delta` in each choice) to each choice's text.
fn collect_deltas(chunk: &Value, texts: &mut Vec<String>, delta: &str) {
    for c in chunk["choices"].as_array().into_iter().flatten() {
        let i = c["index"].as_u64().unwrap_or(0) as usize;
        if i >= texts.len() {
            texts.resize(i.min(1024) + 1, String::new());
        }
        if let (Some(t), Some(s)) = (texts.get_mut(i), c.pointer(delta).and_then(Value::as_str)) {
            t.push_str(s);
        }
    }
}

/// Settles the hold on the upstream's usage; without usage nothing can be charged exactly,
/// so the hold is voided and the node's operator is told (a log line at error level).
#[allow(clippy::too_many_arguments)]
async fn settle(
    state: &AppState,
    charge: Option<Charge>,
    request_id: &str,
    model: &str,
    route: &Route,
    usage: Option<UpstreamUsage>,
    bounds: (u64, u64),
    texts: &[String],
) -> (Option<ReceiptRef>, Option<String>, Option<Usage>) {
    let Some(u) = usage else {
        tracing::error!(request_id, upstream = route.upstream.name(), "the upstream reported no usage: nothing charged");
        void_charge(state, charge).await;
        return (None, None, None);
    };
    let usage = bounded(request_id, route, u, bounds);
    let (receipt, pending) = match (charge, &state.billing) {
        (Some(c), Some(billing)) => {
            let served = tokenomy_billing::Served {
                usage,
                model_sha256: upstream_model_sha256(route),
                request_sha256: c.request_sha256,
                output_sha256: Sha256::digest(serde_json::to_vec(texts).unwrap_or_default()).into(),
            };
            crate::routes::settle_served(billing, c.hold, served, request_id).await
        }
        _ => (None, None),
    };
    state.meter.record_usage(request_id, model, &usage, receipt.as_ref(), false);
    (receipt, pending, Some(usage))
}

/// The upstream's usage within the bounds the hold was placed for (one prompt token per byte
/// of the body and [`PROXIED_TEMPLATE_TOKENS_MAX`]; `max_tokens` × `n`): an upstream cannot make this node charge its client, or
/// sign a receipt, for more than the request could have used. Past them, it is cut, and logged.
fn bounded(request_id: &str, route: &Route, u: UpstreamUsage, (prompt_max, completion_max): (u64, u64)) -> Usage {
    let cap = |v: u32, max: u64| u32::try_from(u64::from(v).min(max)).unwrap_or(u32::MAX);
    let (prompt, completion) = (cap(u.prompt_tokens, prompt_max), cap(u.completion_tokens, completion_max));
    if (prompt, completion) != (u.prompt_tokens, u.completion_tokens) {
        tracing::error!(request_id, upstream = route.upstream.name(), reported = ?u, prompt_max, completion_max, "the upstream reported more tokens than the request could use; charging the bounds");
    }
    Usage { prompt_tokens: prompt, cached_tokens: u.cached_tokens.min(prompt), completion_tokens: completion, reasoning_tokens: u.reasoning_tokens.min(completion) }
}

/// What a proxied receipt names as the model's hash: SHA-256 of `upstream NAME MODEL` (there
/// is no file here to hash; the name says who produced the tokens).
pub(crate) fn upstream_model_sha256(route: &Route) -> [u8; 32] {
    Sha256::digest(format!("upstream {} {}", route.upstream.name(), route.upstream_model)).into()
}

/// An upstream's refusal as this node's answer. A refusal of the request itself (400, 413,
/// 422) is passed on in the upstream's words; anything else is the node's problem, not the
/// client's: a 502 (a 504 for a timeout) naming the upstream and what went wrong, without the
/// upstream's own text, which may hold its internals (the node's log has it).
fn refused(e: UpstreamError) -> AppError {
    if let UpstreamError::Status { status, message, body, .. } = &e {
        if tokenomy_upstream::is_request_fault(*status) {
            let param = body.as_ref().and_then(|b| b.pointer("/error/param")).and_then(Value::as_str).map(str::to_string);
            let mut a = AppError::invalid(message.clone(), param.as_deref());
            a.status = axum::http::StatusCode::from_u16(*status).unwrap_or(axum::http::StatusCode::BAD_REQUEST);
            return a;
        }
    }
    let (status, what) = match &e {
        UpstreamError::Timeout { upstream } => (axum::http::StatusCode::GATEWAY_TIMEOUT, format!("upstream {upstream} did not answer in time")),
        UpstreamError::Connect { upstream, .. } => (axum::http::StatusCode::BAD_GATEWAY, format!("upstream {upstream} could not be reached")),
        UpstreamError::Status { upstream, status, .. } => (axum::http::StatusCode::BAD_GATEWAY, format!("upstream {upstream} failed (HTTP {status})")),
        UpstreamError::Protocol { upstream, .. } => (axum::http::StatusCode::BAD_GATEWAY, format!("upstream {upstream} sent an answer this node could not read")),
    };
    AppError { status, code: Some("upstream_error"), ..AppError::internal(format!("{what}; nothing was charged")) }
}

/// Each upstream's requests, failures and smoothed time to first byte, for `/metrics`.
pub(crate) fn render_metrics(u: &tokenomy_upstream::Upstreams, out: &mut String) {
    use std::fmt::Write;
    use std::sync::atomic::Ordering::Relaxed;
    let series: [(&str, &str, &str, fn(&tokenomy_upstream::Upstream) -> u64); 3] = [
        ("tokenomy_upstream_requests_total", "counter", "Requests sent to each upstream (each try of a failover counts)", |u| u.requests.load(Relaxed)),
        ("tokenomy_upstream_failures_total", "counter", "Requests an upstream failed before answering (unreachable, timed out, or an HTTP error that is not a refusal of the request: 401, 402, 403, 404, 429, 5xx)", |u| u.failures.load(Relaxed)),
        ("tokenomy_upstream_ttfb_ms", "gauge", "Smoothed time to an upstream's first byte (0 until measured)", |u| u.ttfb_ms()),
    ];
    for (name, kind, help, value) in series {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for up in u.upstreams() {
            let _ = writeln!(out, "{name}{{upstream=\"{}\"}} {}", up.name(), value(up));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upstream_cannot_report_more_than_the_request_could_use() {
        let config = tokenomy_upstream::UpstreamsConfig::parse("[[upstream]]\nname = \"u\"\nbase_url = \"http://127.0.0.1:9/v1\"\nmodels = { m = \"m\" }").unwrap();
        let ups = tokenomy_upstream::Upstreams::new(&config, |_| None).unwrap();
        let route = ups.routes("m").remove(0);
        let honest = UpstreamUsage { prompt_tokens: 30, cached_tokens: 10, completion_tokens: 16, reasoning_tokens: 4 };
        assert_eq!(bounded("r", &route, honest, (200, 16)), Usage { prompt_tokens: 30, cached_tokens: 10, completion_tokens: 16, reasoning_tokens: 4 });
        let inflated = UpstreamUsage { prompt_tokens: 1_000_000_000, cached_tokens: 1_000_000_000, completion_tokens: 1_000_000_000, reasoning_tokens: 1_000_000_000 };
        assert_eq!(bounded("r", &route, inflated, (200, 16)), Usage { prompt_tokens: 200, cached_tokens: 200, completion_tokens: 16, reasoning_tokens: 16 });
    }

    #[test]
    fn limits_are_checked_and_set_before_forwarding() {
        let p = prepare(br#"{"model":"m","messages":[],"n":3,"max_completion_tokens":10,"stream":true}"#, Endpoint::Chat).unwrap();
        assert_eq!((p.completion_tokens_max, p.stream, p.include_usage), (30, true, false));
        assert_eq!(p.body["stream_options"], json!({"include_usage": true}), "usage is always asked of the upstream");
        let p = prepare(br#"{"model":"m","messages":[]}"#, Endpoint::Chat).unwrap();
        assert_eq!((p.completion_tokens_max, &p.body["max_tokens"]), (COMPLETION_TOKENS_DEFAULT, &json!(COMPLETION_TOKENS_DEFAULT)));
        // A text completion: 16 tokens unless told, for each choice of each prompt.
        let p = prepare(br#"{"model":"m","prompt":["a","b"],"n":2}"#, Endpoint::Completion).unwrap();
        assert_eq!((p.completion_tokens_max, &p.body["max_tokens"]), (64, &json!(16)));
        let p = prepare(br#"{"model":"m","prompt":[1,2,3],"max_tokens":5}"#, Endpoint::Completion).unwrap();
        assert_eq!(p.completion_tokens_max, 5, "a list of numbers is one prompt");
        let p = prepare(br#"{"model":"m","prompt":"a","max_tokens":0,"echo":true}"#, Endpoint::Completion).unwrap();
        assert_eq!(p.completion_tokens_max, 0, "an echo alone");
        assert!(prepare(br#"{"model":"m","prompt":"a","max_tokens":0}"#, Endpoint::Completion).is_err());
        for (body, param) in [(r#"{"max_tokens":-1}"#, "max_tokens"), (r#"{"max_completion_tokens":0}"#, "max_completion_tokens"), (r#"{"max_tokens":1.5}"#, "max_tokens")] {
            let e = prepare(body.as_bytes(), Endpoint::Chat).err().unwrap();
            assert_eq!(e.param.as_deref(), Some(param), "{body}");
        }
    }
}
