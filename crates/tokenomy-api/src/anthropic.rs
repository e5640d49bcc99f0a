//! Anthropic's Messages API (`POST /v1/messages`, `POST /v1/messages/count_tokens`) on the same
//! engine, metering and billing path as the OpenAI routes: a Messages request is translated into
//! the chat pipeline's request, and its answer (body or chunk stream) back into Anthropic's
//! shapes — content blocks, `tool_use` / `tool_result`, `stop_reason`, and the streaming events
//! `message_start` … `message_stop`. Errors use Anthropic's `{"type": "error", "error": …}`.

use std::convert::Infallible;
use std::sync::{Arc, OnceLock};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::stream::{self, Stream, StreamExt};
use serde_json::{json, Map, Value};

use crate::openai::ChatRequest;
use crate::routes::{self, HashedJson};
use crate::{AppError, AppState};

/// `stop_sequences` a request may name (Anthropic sets no limit of OpenAI's 4; each costs a
/// check per generated token).
pub const STOP_SEQUENCES_MAX: usize = 64;

/// An [`AppError`] rendered in Anthropic's error shape.
pub struct AnthropicError(AppError);

impl From<AppError> for AnthropicError {
    fn from(e: AppError) -> Self {
        AnthropicError(e)
    }
}

impl From<tokenomy_core::BackendError> for AnthropicError {
    fn from(e: tokenomy_core::BackendError) -> Self {
        AnthropicError(e.into())
    }
}

fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        500..=599 => "api_error",
        _ => "invalid_request_error",
    }
}

impl IntoResponse for AnthropicError {
    fn into_response(self) -> Response {
        let e = self.0;
        // The chat pipeline's checks name OpenAI's fields; a Messages client knows Anthropic's.
        let message = e.message.replace("tool_call_id", "tool_use_id").replace("tool_calls", "tool_use blocks");
        // A full queue is Anthropic's `overloaded_error` (529, which its SDKs retry), not a rate limit.
        let (status, kind) = match e.code {
            Some("overloaded") => (StatusCode::from_u16(529).expect("a valid status"), "overloaded_error"),
            _ => (e.status, error_type(e.status)),
        };
        let body = json!({"type": "error", "error": {"type": kind, "message": message}});
        let mut r = (status, Json(body)).into_response();
        if status.as_u16() == 529 {
            // (No standard status: HTTP/1 would send it with an empty reason phrase.)
            r.extensions_mut().insert(hyper::ext::ReasonPhrase::from_static(b"Overloaded"));
        }
        e.add_headers(&mut r);
        r
    }
}

/// `e` in Anthropic's error shape under `/v1/messages`, in OpenAI's elsewhere.
pub(crate) fn shaped_for(path: &str, e: AppError) -> Response {
    match path.starts_with("/v1/messages") {
        true => AnthropicError(e).into_response(),
        false => e.into_response(),
    }
}

fn invalid(message: impl Into<String>) -> AppError {
    AppError::invalid(message, None)
}

/// Text of a `content` that is a string or a list of blocks of the given kinds.
fn text_of(content: &Value, what: &str) -> Result<String, AppError> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) => {
            let mut out = String::new();
            for b in blocks {
                match (b["type"].as_str(), b["text"].as_str()) {
                    (Some("text"), Some(t)) => out.push_str(t),
                    _ => return Err(invalid(format!("{what}: only text blocks are supported here, got {}", b["type"]))),
                }
            }
            Ok(out)
        }
        Value::Null => Ok(String::new()),
        _ => Err(invalid(format!("{what} must be a string or a list of content blocks"))),
    }
}

/// One Anthropic message as OpenAI chat messages (a `user` turn may carry tool results, which
/// become `tool` messages; an `assistant` turn may carry `tool_use` blocks, which become calls).
fn messages_of(m: &Value, i: usize) -> Result<Vec<Value>, AppError> {
    let role = m["role"].as_str().unwrap_or_default();
    if role != "user" && role != "assistant" {
        return Err(invalid(format!("messages.{i}.role must be \"user\" or \"assistant\"")));
    }
    let Value::Array(blocks) = &m["content"] else {
        return Ok(vec![json!({"role": role, "content": text_of(&m["content"], &format!("messages.{i}.content"))?})]);
    };
    let (mut text, mut calls, mut results) = (String::new(), Vec::new(), Vec::new());
    for (j, b) in blocks.iter().enumerate() {
        match b["type"].as_str() {
            Some("text") => text.push_str(b["text"].as_str().unwrap_or_default()),
            Some("tool_use") if role == "assistant" => calls.push(json!({
                "id": b["id"], "type": "function",
                "function": {"name": b["name"], "arguments": b["input"].to_string()},
            })),
            Some("tool_result") if role == "user" => results.push(json!({
                "role": "tool", "tool_call_id": b["tool_use_id"],
                "content": text_of(&b["content"], &format!("messages.{i}.content.{j}.content"))?,
            })),
            // Thinking from earlier turns is not fed back (Anthropic strips it from the context too).
            Some("thinking" | "redacted_thinking") if role == "assistant" => {}
            other => return Err(invalid(format!("messages.{i}.content.{j}: unsupported block type {} for role {role}", crate::openai::shown(other)))),
        }
    }
    let mut out = results;
    if !text.is_empty() || !calls.is_empty() || out.is_empty() {
        let mut msg = json!({"role": role, "content": text});
        if !calls.is_empty() {
            msg["tool_calls"] = Value::Array(calls);
        }
        out.push(msg);
    }
    Ok(out)
}

/// A user turn after an assistant turn with `tool_use` blocks answers each of them with a
/// `tool_result` block, as Anthropic requires (a conversation that goes on without a call's
/// result is an agent's bug, not something to answer and bill).
fn answered(previous: &Value, m: &Value, i: usize) -> Result<(), AppError> {
    let blocks = |v: &Value, kind: &str, key: &str| -> Vec<String> {
        v["content"].as_array().into_iter().flatten().filter(|b| b["type"] == kind).filter_map(|b| b[key].as_str().map(str::to_string)).collect()
    };
    if previous["role"] != "assistant" {
        return Ok(());
    }
    let results = blocks(m, "tool_result", "tool_use_id");
    let missing: Vec<String> = blocks(previous, "tool_use", "id").into_iter().filter(|id| !results.contains(id)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(invalid(format!(
        "messages.{i}: `tool_use` ids were found without `tool_result` blocks immediately after: {}. Each `tool_use` block must have a corresponding `tool_result` block in the next message.",
        missing.join(", ")
    )))
}

/// Anthropic's structured output (`output_config.format`, or the older `output_format`), a
/// JSON schema the answer is constrained to: the chat pipeline's `response_format`.
fn output_format(o: &Map<String, Value>) -> Result<Option<Value>, AppError> {
    if let Some(effort) = o.get("output_config").and_then(|c| c.get("effort")).filter(|e| !e.is_null()) {
        // Checked and not acted on, as OpenAI's `reasoning_effort` is.
        if !matches!(effort.as_str(), Some("low" | "medium" | "high" | "xhigh" | "max")) {
            return Err(invalid(format!("output_config.effort must be low, medium, high, xhigh or max, got {effort}")));
        }
    }
    let (format, param) = match (o.get("output_config").and_then(|c| c.get("format")), o.get("output_format")) {
        (Some(f), _) if !f.is_null() => (f, "output_config.format"),
        (_, Some(f)) if !f.is_null() => (f, "output_format"),
        _ => return Ok(None),
    };
    if format["type"] != "json_schema" || !format["schema"].is_object() {
        return Err(invalid(format!("{param} must be {{\"type\": \"json_schema\", \"schema\": {{…}}}}")));
    }
    Ok(Some(json!({"type": "json_schema", "json_schema": {"name": "output", "schema": format["schema"], "strict": true}})))
}

/// The Messages request as the chat pipeline's (OpenAI-shaped) request.
fn to_chat(body: &Value, count_only: bool) -> Result<Value, AppError> {
    let o = body.as_object().ok_or_else(|| invalid("the body must be a JSON object"))?;
    let model = match o.get("model") {
        None | Some(Value::Null) => return Err(invalid("model: field required")),
        Some(v) => v.as_str().ok_or_else(|| invalid(format!("model: a string is required, got {v}")))?,
    };
    let max_tokens = match o.get("max_tokens") {
        None if !count_only => return Err(invalid("max_tokens: field required")),
        None => None,
        Some(v) => Some(v.as_i64().ok_or_else(|| invalid(format!("max_tokens: a whole number of tokens is required, got {v}")))?),
    };
    let mut messages = Vec::new();
    if let Some(system) = o.get("system") {
        messages.push(json!({"role": "system", "content": text_of(system, "system")?}));
    }
    let list = match o.get("messages") {
        None => return Err(invalid("messages: field required")),
        Some(Value::Array(list)) => list,
        Some(other) => return Err(invalid(format!("messages: an array of messages is required, got {}", crate::openai::json_type(other)))),
    };
    for (i, m) in list.iter().enumerate() {
        if i > 0 {
            answered(&list[i - 1], m, i)?;
        }
        // As Anthropic has it: an empty turn is a client's mistake, but for a final assistant
        // turn (a prefill of nothing).
        let empty = m["content"].as_str().is_some_and(str::is_empty) || m["content"].as_array().is_some_and(Vec::is_empty);
        if empty && !(i + 1 == list.len() && m["role"] == "assistant") {
            return Err(invalid(format!("messages.{i}: all messages must have non-empty content except for the optional final assistant message")));
        }
        messages.extend(messages_of(m, i)?);
    }
    let mut chat = Map::new();
    chat.insert("model".into(), json!(model));
    chat.insert("messages".into(), Value::Array(messages));
    if let Some(n) = max_tokens {
        chat.insert("max_tokens".into(), json!(n));
    }
    // Anthropic's temperature runs from 0 to 1 (OpenAI's, which the chat pipeline checks, to 2).
    if let Some(t) = o.get("temperature").and_then(Value::as_f64).filter(|t| !(0.0..=1.0).contains(t)) {
        return Err(invalid(format!("temperature: must be between 0 and 1, got {t}")));
    }
    for (from, to) in [("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"), ("stop_sequences", "stop")] {
        if let Some(v) = o.get(from) {
            chat.insert(to.into(), v.clone());
        }
    }
    if let Some(tools) = o.get("tools").and_then(Value::as_array) {
        for (i, t) in tools.iter().enumerate() {
            // Anthropic's server tools (web search, code execution, …) name a versioned type;
            // a client tool has none, or "custom".
            if let Some(ty) = t["type"].as_str().filter(|ty| *ty != "custom") {
                return Err(invalid(format!(
                    "tools.{i}.type: {ty:?} is not a client tool; server tools (web search, code execution, …) are not served here, client tools (a name and an input_schema) are"
                )));
            }
            if !t["input_schema"].is_object() || t["input_schema"].get("type").is_some_and(|ty| ty != "object") {
                return Err(invalid(format!("tools.{i}.input_schema: a JSON Schema object with \"type\": \"object\" is required")));
            }
        }
        let defs: Vec<Value> = tools
            .iter()
            .map(|t| json!({"type": "function", "function": {"name": t["name"], "description": t["description"], "parameters": t["input_schema"]}}))
            .collect();
        chat.insert("tools".into(), Value::Array(defs));
    }
    if let Some(format) = output_format(o)? {
        chat.insert("response_format".into(), format);
    }
    if let Some(tc) = o.get("tool_choice") {
        let choice = match tc["type"].as_str() {
            Some("auto") => json!("auto"),
            Some("any") => json!("required"),
            Some("none") => json!("none"),
            Some("tool") => json!({"type": "function", "function": {"name": tc["name"]}}),
            other => return Err(invalid(format!("tool_choice.type must be auto, any, tool or none, got {}", crate::openai::shown(other)))),
        };
        chat.insert("tool_choice".into(), choice);
        if tc["disable_parallel_tool_use"].as_bool() == Some(true) {
            chat.insert("parallel_tool_calls".into(), json!(false));
        }
    }
    if let Some(t) = o.get("thinking") {
        match t["type"].as_str() {
            // A model that thinks does so anyway; the budget caps it.
            Some("enabled") => {
                let budget = t["budget_tokens"].as_i64().ok_or_else(|| invalid("thinking.budget_tokens: a whole number of tokens is required"))?;
                if !(0..=i64::from(u32::MAX)).contains(&budget) {
                    return Err(invalid(format!("thinking.budget_tokens must be a whole number of tokens from 0 to {}, got {budget}", u32::MAX)));
                }
                chat.insert("thinking_token_budget".into(), json!(budget));
            }
            // The model decides whether to think: one that does, does (no budget).
            Some("disabled" | "adaptive") => {}
            other => return Err(invalid(format!("thinking.type must be enabled, adaptive or disabled, got {}", crate::openai::shown(other)))),
        }
    }
    if o.get("stream").and_then(Value::as_bool) == Some(true) {
        chat.insert("stream".into(), json!(true));
        chat.insert("stream_options".into(), json!({"include_usage": true}));
    }
    Ok(Value::Object(chat))
}

/// Anthropic's `stop_reason` and `stop_sequence` for an OpenAI choice: its `finish_reason`,
/// and its `stop_reason` (the stop string that ended it, if one did).
fn stop_of(choice: &Value) -> (&'static str, Value) {
    let sequence = choice["stop_reason"].as_str().map(|s| json!(s)).unwrap_or(Value::Null);
    let reason = match choice["finish_reason"].as_str() {
        Some("length") => "max_tokens",
        Some("tool_calls") => "tool_use",
        // Cut by the node (a shutdown): Anthropic's turn that was paused and may be sent back
        // as-is to be continued (a prefill, which this node continues too).
        Some("abort") => "pause_turn",
        _ if !sequence.is_null() => "stop_sequence",
        _ => "end_turn",
    };
    (reason, sequence)
}

fn tool_use_id(openai_id: &str) -> String {
    format!("toolu_{}", openai_id.trim_start_matches("call_"))
}

fn usage_of(u: &Value) -> Value {
    json!({
        "input_tokens": u["prompt_tokens"].as_u64().unwrap_or(0) - u["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or(0),
        "cache_read_input_tokens": u["prompt_tokens_details"]["cached_tokens"],
        "output_tokens": u["completion_tokens"],
    })
}

/// An OpenAI chat completion body as an Anthropic message.
fn to_message(v: &Value) -> Value {
    let c = &v["choices"][0];
    let m = &c["message"];
    let mut content = Vec::new();
    if let Some(t) = m["reasoning_content"].as_str().filter(|t| !t.is_empty()) {
        // Anthropic's signature is its own; this node proves its output with the receipt.
        content.push(json!({"type": "thinking", "thinking": t, "signature": ""}));
    }
    if let Some(t) = m["content"].as_str().filter(|t| !t.is_empty()) {
        content.push(json!({"type": "text", "text": t}));
    }
    for call in m["tool_calls"].as_array().into_iter().flatten() {
        let input: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap_or("{}")).unwrap_or(json!({}));
        content.push(json!({"type": "tool_use", "id": tool_use_id(call["id"].as_str().unwrap_or_default()), "name": call["function"]["name"], "input": input}));
    }
    let (stop_reason, stop_sequence) = stop_of(c);
    let mut out = json!({
        "id": format!("msg_{}", v["id"].as_str().unwrap_or_default().trim_start_matches("chatcmpl-")),
        "type": "message", "role": "assistant", "model": v["model"], "content": content,
        "stop_reason": stop_reason, "stop_sequence": stop_sequence,
        "usage": usage_of(&v["usage"]),
    });
    if !v["receipt"].is_null() {
        out["receipt"] = v["receipt"].clone();
    }
    out
}

pub async fn messages(State(state): State<AppState>, headers: HeaderMap, body: Result<HashedJson<Value>, AppError>) -> Result<Response, AnthropicError> {
    // A body that cannot be read or parsed is answered in Anthropic's error shape too.
    let body = body?;
    let chat_json = to_chat(&body.value, false)?;
    // (Forwarded as is when an upstream serves the model: kept only where there are upstreams.)
    let raw = match state.upstreams {
        Some(_) => serde_json::to_vec(&chat_json).unwrap_or_default().into(),
        None => bytes::Bytes::new(),
    };
    let mut chat: ChatRequest = serde_json::from_value(chat_json).map_err(|e| invalid(format!("invalid request: {e}")))?;
    chat.common.stops_max = Some(STOP_SEQUENCES_MAX);
    let g = match routes::gate(&state, &headers, "/v1/messages", body.sha256).await? {
        Ok(g) => g,
        Err(replay) => return Ok(replay),
    };
    let chat = HashedJson { value: chat, sha256: body.sha256, raw };
    Ok(routes::run_remembered(&state, g, chat, |s, g, b| Box::pin(run(s, g, b))).await?)
}

async fn run(state: &AppState, g: &routes::Gate, chat: HashedJson<ChatRequest>) -> Result<Response, AppError> {
    if crate::proxy::routes_here(state, &chat.value.common.model, 1) {
        return proxied(state, g, chat).await;
    }
    let (raw, sha256) = (chat.raw.clone(), chat.sha256);
    let r = match routes::chat_run(state, g, chat).await {
        // The local queue filled up meanwhile: an upstream serving the model takes it.
        Err(e) if crate::proxy::overflows(state, &e, &raw) => return proxied_raw(state, g, raw, sha256).await,
        r => r?,
    };
    let rid = r.started.request_id.clone();
    if r.stream {
        let cached = Arc::new(OnceLock::new());
        let events = events(routes::chat_stream(r.started, r.id, true, r.post, Some(cached.clone())), u64::from(r.prompt_tokens), cached);
        return Ok(routes::billed_headers(Sse::new(events).into_response(), &rid, r.receipt_id.as_deref(), &g.allowance_now(&state).await));
    }
    let (Json(v), receipt_id) = routes::chat_body(r.started, r.id, &r.post).await?;
    Ok(routes::billed_headers(Json(to_message(&v)).into_response(), &rid, receipt_id.as_deref(), &g.allowance_now(&state).await))
}

/// A message answered by an upstream: its chat answer translated as a local one is. (A
/// stream's `message_start` cannot know the prompt's tokens, which the upstream counts: it
/// says 0, and `message_delta`'s usage has them.)
async fn proxied(state: &AppState, g: &routes::Gate, chat: HashedJson<ChatRequest>) -> Result<Response, AppError> {
    proxied_raw(state, g, chat.raw, chat.sha256).await
}

async fn proxied_raw(state: &AppState, g: &routes::Gate, raw: bytes::Bytes, sha256: [u8; 32]) -> Result<Response, AppError> {
    let (answer, billed) = crate::proxy::run(state, g, raw, sha256, crate::proxy::Endpoint::Chat).await?;
    let resp = match answer {
        crate::proxy::ProxyAnswer::Whole(v) => Json(to_message(&v)).into_response(),
        crate::proxy::ProxyAnswer::Stream(chunks) => Sse::new(events(chunks, 0, Arc::new(OnceLock::from(0)))).into_response(),
    };
    Ok(billed.respond(state, g, resp).await)
}

/// Which content block is open in the stream being translated.
#[derive(Default)]
struct StreamState {
    started: bool,
    index: i64,
    open: Option<&'static str>,
    stop: Option<(&'static str, Value)>,
    /// The prompt's tokens, for `message_start`, and the share of them the prefix cache held,
    /// set when the engine admits the request (before its first token).
    input_tokens: u64,
    cached: Arc<OnceLock<u32>>,
    /// An `error` event was sent: Anthropic's stream ends there (no `message_delta` or
    /// `message_stop` after it).
    failed: bool,
}

fn ev(name: &str, data: Value) -> SseEvent {
    SseEvent::default().event(name).data(data.to_string())
}

impl StreamState {
    fn close(&mut self, out: &mut Vec<SseEvent>) {
        if self.open.take().is_some() {
            out.push(ev("content_block_stop", json!({"type": "content_block_stop", "index": self.index})));
            self.index += 1;
        }
    }

    fn chunk(&mut self, c: &Value) -> Vec<SseEvent> {
        let mut out = Vec::new();
        if self.failed {
            return out;
        }
        if c.get("error").is_some() {
            self.failed = true;
            out.push(ev("error", json!({"type": "error", "error": {"type": "api_error", "message": c["error"]["message"]}})));
            return out;
        }
        let choice = &c["choices"][0];
        let opening = choice["delta"].as_object().is_some_and(|d| d.keys().all(|k| k == "role" || k == "content") && d.get("content") == Some(&json!("")));
        if opening && choice["finish_reason"].is_null() && !c["usage"].is_object() {
            // OpenAI's first chunk (the role alone), sent before the engine admits the request:
            // `message_start` waits for the first real one, when the cached share is known.
            return out;
        }
        if !self.started {
            self.started = true;
            let id = format!("msg_{}", c["id"].as_str().unwrap_or_default().trim_start_matches("chatcmpl-"));
            let cached = u64::from(self.cached.get().copied().unwrap_or(0)).min(self.input_tokens);
            out.push(ev("message_start", json!({"type": "message_start", "message": {
                "id": id, "type": "message", "role": "assistant", "model": c["model"], "content": [],
                "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": self.input_tokens - cached, "cache_read_input_tokens": cached, "output_tokens": 0}}})));
        }
        let delta = &choice["delta"];
        if let Some(t) = delta["reasoning_content"].as_str().filter(|t| !t.is_empty()) {
            if self.open != Some("thinking") {
                self.close(&mut out);
                self.open = Some("thinking");
                out.push(ev("content_block_start", json!({"type": "content_block_start", "index": self.index, "content_block": {"type": "thinking", "thinking": "", "signature": ""}})));
            }
            out.push(ev("content_block_delta", json!({"type": "content_block_delta", "index": self.index, "delta": {"type": "thinking_delta", "thinking": t}})));
        }
        if let Some(t) = delta["content"].as_str().filter(|t| !t.is_empty()) {
            if self.open != Some("text") {
                self.close(&mut out);
                self.open = Some("text");
                out.push(ev("content_block_start", json!({"type": "content_block_start", "index": self.index, "content_block": {"type": "text", "text": ""}})));
            }
            out.push(ev("content_block_delta", json!({"type": "content_block_delta", "index": self.index, "delta": {"type": "text_delta", "text": t}})));
        }
        for tc in delta["tool_calls"].as_array().into_iter().flatten() {
            if let Some(id) = tc["id"].as_str() {
                self.close(&mut out);
                self.open = Some("tool_use");
                out.push(ev("content_block_start", json!({"type": "content_block_start", "index": self.index,
                    "content_block": {"type": "tool_use", "id": tool_use_id(id), "name": tc["function"]["name"], "input": {}}})));
            }
            if let Some(a) = tc["function"]["arguments"].as_str().filter(|a| !a.is_empty()) {
                out.push(ev("content_block_delta", json!({"type": "content_block_delta", "index": self.index, "delta": {"type": "input_json_delta", "partial_json": a}})));
            }
        }
        if choice["finish_reason"].is_string() {
            self.stop = Some(stop_of(choice));
        }
        if c["usage"].is_object() {
            self.close(&mut out);
            let (reason, sequence) = self.stop.take().unwrap_or(("end_turn", Value::Null));
            let mut d = json!({"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence}, "usage": usage_of(&c["usage"])});
            if !c["receipt"].is_null() {
                d["receipt"] = c["receipt"].clone();
            }
            out.push(ev("message_delta", d));
            out.push(ev("message_stop", json!({"type": "message_stop"})));
        }
        out
    }
}

fn events(chunks: impl Stream<Item = Value> + Send + 'static, input_tokens: u64, cached: Arc<OnceLock<u32>>) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let mut st = StreamState { input_tokens, cached, ..StreamState::default() };
    chunks.flat_map(move |c| stream::iter(st.chunk(&c))).map(Ok)
}

/// `POST /v1/messages/count_tokens`: the prompt's tokens as the model's template renders them.
pub async fn count_tokens(State(state): State<AppState>, headers: HeaderMap, body: Result<HashedJson<Value>, AppError>) -> Result<Json<Value>, AnthropicError> {
    let body = body?;
    crate::charge::caller(&state, &headers).await?;
    let chat: ChatRequest = serde_json::from_value(to_chat(&body.value, true)?).map_err(|e| invalid(format!("invalid request: {e}")))?;
    crate::proxy::not_forwarded(&state, &chat.common.model, "/v1/messages/count_tokens")?;
    let messages = crate::openai::chat_messages(&chat.messages)?;
    // As `messages` renders it: with `tool_choice: none` the tools are left out of the prompt.
    let tools = crate::openai::tools(chat.tools.as_ref(), chat.tool_choice.as_ref())?;
    let active = tools.filter(|t| t.choice != crate::openai::ToolChoice::None);
    let defs: &[Value] = active.as_ref().map_or(&[], |t| &t.defs);
    let n = crate::routes::blocking(|| state.backend.render_chat(&chat.common.model, &messages, defs))?.tokens.len();
    Ok(Json(json!({"input_tokens": n})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_is_a_529_with_a_reason_phrase() {
        let r = AnthropicError(AppError::overloaded("full")).into_response();
        assert_eq!(r.status().as_u16(), 529);
        assert_eq!(r.extensions().get::<hyper::ext::ReasonPhrase>().map(|p| p.as_bytes()), Some(&b"Overloaded"[..]));
    }

    /// `message_start` waits for the engine's admission (OpenAI's first chunk, the role alone,
    /// comes before it) and splits the prompt into computed and cached tokens.
    #[test]
    fn message_start_splits_the_prompt_as_the_engine_admitted_it() {
        let mut st = StreamState { input_tokens: 40, ..StreamState::default() };
        let head = json!({"id": "chatcmpl-1", "model": "m", "choices": [{"delta": {"role": "assistant", "content": ""}, "finish_reason": null}]});
        assert!(st.chunk(&head).is_empty());
        st.cached.set(30).unwrap();
        let text = json!({"id": "chatcmpl-1", "model": "m", "choices": [{"delta": {"content": "Hi"}, "finish_reason": null}]});
        let start = st.chunk(&text).remove(0);
        let expected = SseEvent::default().event("message_start").data(json!({"type": "message_start", "message": {
            "id": "msg_1", "type": "message", "role": "assistant", "model": "m", "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": 10, "cache_read_input_tokens": 30, "output_tokens": 0}}}).to_string());
        assert_eq!(format!("{start:?}"), format!("{expected:?}"));
        // A first chunk with no content (a tool call's, or logprobs alone) starts the message too.
        let mut st = StreamState::default();
        let empty = json!({"id": "chatcmpl-2", "model": "m", "choices": [{"delta": {}, "finish_reason": null}]});
        assert_eq!(st.chunk(&empty).len(), 1, "message_start");
    }

    #[test]
    fn an_answer_the_node_cut_is_a_paused_turn() {
        assert_eq!(stop_of(&json!({"finish_reason": "abort"})), ("pause_turn", Value::Null));
        assert_eq!(stop_of(&json!({"finish_reason": "length"})).0, "max_tokens");
    }

    #[test]
    fn a_stream_ends_at_its_error_event() {
        let mut st = StreamState::default();
        let text = json!({"id": "chatcmpl-1", "model": "m", "choices": [{"delta": {"content": "Hi"}, "finish_reason": null}]});
        assert_eq!(st.chunk(&text).len(), 3, "message_start, content_block_start, content_block_delta");
        assert_eq!(st.chunk(&json!({"error": {"message": "the engine failed"}})).len(), 1);
        let last = json!({"choices": [{"delta": {}, "finish_reason": "length"}], "usage": {"prompt_tokens": 1, "completion_tokens": 1}});
        assert!(st.chunk(&last).is_empty(), "nothing after the error event");
    }
}
