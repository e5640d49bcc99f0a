//! OpenAI's Responses API (`POST /v1/responses`, `GET`/`DELETE /v1/responses/{id}`) on the same
//! engine, metering and billing path as chat completions, shaped like [`crate::anthropic`]: a
//! Responses request (instructions, input items, function tools, `text.format`) is translated
//! into the chat pipeline's request, and its answer (body or chunk stream) back into a response
//! object — output items `reasoning`, `message` and `function_call` — or into the streaming
//! events `response.created` … `response.completed`.
//!
//! `store` (OpenAI's default) keeps the conversation, bounded in count and bytes, so that
//! `previous_response_id` continues it: in this node's memory (lost at restart), or, on a
//! PostgreSQL ledger, in its database, where every node of the ledger finds it. Agents that keep
//! their own history send `store: false` and the whole input.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::stream::{self, Stream, StreamExt};
use serde_json::{json, Map, Value};
use tokenomy_ledger::AccountId;

use crate::openai::{shown, ChatRequest};
use crate::routes::{self, HashedJson};
use crate::{AppError, AppState};

/// Responses kept for `previous_response_id` and `GET /v1/responses/{id}`, at most.
pub const RESPONSES_STORED_MAX: usize = 10_000;
/// Bytes of kept conversations (their JSON), at most; the oldest go first.
pub const RESPONSES_STORED_BYTES_MAX: usize = 256 << 20;
/// One account's share of the store, at most (its own oldest go first past it): no account can
/// push every other account's conversations out alone.
pub const RESPONSES_STORED_PER_ACCOUNT_MAX: usize = RESPONSES_STORED_MAX / 10;
pub const RESPONSES_STORED_PER_ACCOUNT_BYTES_MAX: usize = RESPONSES_STORED_BYTES_MAX / 10;

fn invalid(param: &str, message: impl Into<String>) -> AppError {
    AppError::invalid_value(param, message)
}

/// A response kept for its conversation to be continued.
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct Stored {
    /// The account that asked for it; `None` on a node without accounts.
    #[serde(skip)]
    owner: Option<AccountId>,
    /// The conversation as chat messages: what came before, its input and its answer
    /// (instructions are not carried over, as OpenAI's are not).
    history: Vec<Value>,
    input_items: Vec<Value>,
    response: Value,
    #[serde(skip)]
    bytes: usize,
}

/// Kept responses, oldest first out: in this node's memory, or, on a PostgreSQL ledger, in
/// its database, where every node of the ledger finds them (a load balancer may send a
/// conversation's next turn to any node).
#[derive(Default)]
pub(crate) struct ResponseStore {
    inner: Mutex<StoreInner>,
    shared: Option<tokenomy_ledger::PgStore>,
}

#[derive(Default)]
struct StoreInner {
    by_id: HashMap<String, Arc<Stored>>,
    order: VecDeque<String>,
    bytes: usize,
}

impl StoreInner {
    /// Drops `owner`'s own oldest responses until one more of `bytes` fits its share.
    fn make_room_for(&mut self, owner: Option<AccountId>, bytes: usize) {
        loop {
            let mine = self.by_id.values().filter(|r| r.owner == owner);
            let (count, used) = mine.fold((0, 0), |(c, b), r| (c + 1, b + r.bytes));
            if count < RESPONSES_STORED_PER_ACCOUNT_MAX && used + bytes <= RESPONSES_STORED_PER_ACCOUNT_BYTES_MAX {
                return;
            }
            let Some(at) = self.order.iter().position(|id| self.by_id.get(id).is_some_and(|r| r.owner == owner)) else { return };
            let id = self.order.remove(at).expect("found");
            if let Some(gone) = self.by_id.remove(&id) {
                self.bytes -= gone.bytes;
            }
        }
    }
}

/// The bounds of the store, as the shared database applies them.
const SHARED_LIMITS: tokenomy_ledger::KeptLimits = tokenomy_ledger::KeptLimits {
    count_max: RESPONSES_STORED_MAX as u64,
    bytes_max: RESPONSES_STORED_BYTES_MAX as u64,
    per_owner_count_max: RESPONSES_STORED_PER_ACCOUNT_MAX as u64,
    per_owner_bytes_max: RESPONSES_STORED_PER_ACCOUNT_BYTES_MAX as u64,
};

fn unavailable(e: tokenomy_ledger::LedgerError) -> AppError {
    AppError::from(tokenomy_billing::BillingError::from(e))
}

impl ResponseStore {
    /// Keeps responses in `pg`, shared by every node of its ledger.
    pub(crate) fn shared(pg: tokenomy_ledger::PgStore) -> ResponseStore {
        ResponseStore { shared: Some(pg), ..Default::default() }
    }

    /// Keeps a response; one that cannot be kept (too large, or the database failed) is
    /// logged, and a later `previous_response_id` naming it is answered as for any unknown id.
    async fn put(&self, owner: Option<AccountId>, history: Vec<Value>, input_items: Vec<Value>, response: Value) {
        let id = response["id"].as_str().unwrap_or_default().to_string();
        let Some(pg) = &self.shared else {
            return self.put_here(owner, Stored { owner, history, input_items, response, bytes: 0 });
        };
        let doc = serde_json::to_vec(&Stored { owner, history, input_items, response, bytes: 0 }).unwrap_or_default();
        match tokenomy_ledger::any::pg_within(pg, 0, pg.keep_response(&id, owner, &doc, SHARED_LIMITS)).await {
            Ok(true) => {}
            Ok(false) => tracing::warn!(id, bytes = doc.len(), "a response too large to keep"),
            Err(e) => tracing::warn!(id, error = %e, "a response could not be kept"),
        }
    }

    fn put_here(&self, owner: Option<AccountId>, mut stored: Stored) {
        let id = stored.response["id"].as_str().unwrap_or_default().to_string();
        let bytes = stored.history.iter().chain(&stored.input_items).map(|m| m.to_string().len()).sum::<usize>() + stored.response.to_string().len();
        if bytes > RESPONSES_STORED_BYTES_MAX {
            tracing::warn!(id, bytes, "a response too large to keep");
            return;
        }
        if owner.is_some() && bytes > RESPONSES_STORED_PER_ACCOUNT_BYTES_MAX {
            tracing::warn!(id, bytes, "a response too large to keep");
            return;
        }
        stored.bytes = bytes;
        let mut s = self.inner.lock().expect("response store");
        if owner.is_some() {
            s.make_room_for(owner, bytes);
        }
        while s.by_id.len() >= RESPONSES_STORED_MAX || s.bytes + bytes > RESPONSES_STORED_BYTES_MAX {
            let Some(old) = s.order.pop_front() else { break };
            if let Some(gone) = s.by_id.remove(&old) {
                s.bytes -= gone.bytes;
            }
        }
        s.bytes += bytes;
        s.order.push_back(id.clone());
        s.by_id.insert(id, Arc::new(stored));
        debug_assert_eq!(s.bytes, s.by_id.values().map(|v| v.bytes).sum::<usize>());
    }

    /// The response `id` if `caller` may see it (another account's is as good as missing).
    async fn get(&self, id: &str, caller: Option<AccountId>) -> Result<Option<Arc<Stored>>, AppError> {
        let Some(pg) = &self.shared else {
            let s = self.inner.lock().expect("response store");
            return Ok(s.by_id.get(id).filter(|r| r.owner.is_none() || r.owner == caller).cloned());
        };
        let kept = tokenomy_ledger::any::pg_within(pg, 0, pg.kept_response(id)).await.map_err(unavailable)?;
        let Some(kept) = kept.filter(|k| k.owner.is_none() || k.owner == caller) else { return Ok(None) };
        let mut stored: Stored = serde_json::from_slice(&kept.doc).map_err(|e| AppError::internal(format!("kept response {id} unreadable: {e}")))?;
        (stored.owner, stored.bytes) = (kept.owner, kept.doc.len());
        Ok(Some(Arc::new(stored)))
    }

    async fn delete(&self, id: &str, caller: Option<AccountId>) -> Result<bool, AppError> {
        if let Some(pg) = &self.shared {
            return tokenomy_ledger::any::pg_within(pg, 0, pg.forget_response(id, caller)).await.map_err(unavailable);
        }
        let mut s = self.inner.lock().expect("response store");
        if s.by_id.get(id).is_none_or(|r| r.owner.is_some() && r.owner != caller) {
            return Ok(false);
        }
        let gone = s.by_id.remove(id).expect("present");
        s.bytes -= gone.bytes;
        s.order.retain(|k| k != id);
        Ok(true)
    }
}

/// Text of a message's `content`: a string or a list of text parts.
fn text_of(content: &Value, param: &str) -> Result<String, AppError> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut out = String::new();
            for (i, p) in parts.iter().enumerate() {
                match p["type"].as_str() {
                    Some("input_text" | "output_text" | "text") => out.push_str(p["text"].as_str().unwrap_or_default()),
                    Some("refusal") => out.push_str(p["refusal"].as_str().unwrap_or_default()),
                    other => return Err(invalid(&format!("{param}.{i}"), format!("only text content is served here, got {}", shown(other)))),
                }
            }
            Ok(out)
        }
        Value::Null => Ok(String::new()),
        _ => Err(invalid(param, format!("{param} must be a string or a list of content parts"))),
    }
}

/// The input items as chat messages: consecutive `function_call`s join the assistant turn before
/// them, `function_call_output`s become `tool` messages, reasoning from earlier turns is dropped.
fn input_messages(input: &Value) -> Result<Vec<Value>, AppError> {
    let items = match input {
        Value::String(s) => return Ok(vec![json!({"role": "user", "content": s})]),
        Value::Array(items) => items,
        Value::Null => return Err(invalid("input", "input: field required")),
        _ => return Err(invalid("input", "input must be a string or a list of items")),
    };
    let mut out: Vec<Value> = Vec::new();
    // Whether the last message is an assistant turn that a following call may join.
    let mut open_turn = false;
    for (i, item) in items.iter().enumerate() {
        let param = format!("input.{i}");
        let kind = item["type"].as_str().or(item.get("role").map(|_| "message"));
        match kind {
            Some("message") => {
                let role = item["role"].as_str().unwrap_or_default();
                if !matches!(role, "user" | "assistant" | "system" | "developer") {
                    return Err(invalid(&format!("{param}.role"), format!("role must be user, assistant, system or developer, got {}", shown(Some(role)))));
                }
                if item["content"].is_null() {
                    return Err(invalid(&format!("{param}.content"), "a message item needs content"));
                }
                out.push(json!({"role": role, "content": text_of(&item["content"], &format!("{param}.content"))?}));
                open_turn = role == "assistant";
            }
            Some("function_call") => {
                let (Some(call_id), Some(name)) = (item["call_id"].as_str(), item["name"].as_str()) else {
                    return Err(invalid(&param, "a function_call item needs call_id and name"));
                };
                let arguments = item["arguments"].as_str().unwrap_or("{}");
                let call = json!({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}});
                match out.last_mut() {
                    Some(turn) if open_turn => match turn["tool_calls"].as_array_mut() {
                        Some(calls) => calls.push(call),
                        None => turn["tool_calls"] = json!([call]),
                    },
                    _ => out.push(json!({"role": "assistant", "content": "", "tool_calls": [call]})),
                }
                open_turn = true;
            }
            Some("function_call_output") => {
                let Some(call_id) = item["call_id"].as_str() else { return Err(invalid(&param, "a function_call_output item needs call_id")) };
                out.push(json!({"role": "tool", "tool_call_id": call_id, "content": text_of(&item["output"], &format!("{param}.output"))?}));
                open_turn = false;
            }
            // Earlier turns' reasoning is not fed back (as the chat template drops it too).
            Some("reasoning") => {}
            Some("item_reference") => return Err(invalid(&param, "item references are not served: send the item itself, or continue with previous_response_id")),
            other => return Err(invalid(&format!("{param}.type"), format!("only message, function_call, function_call_output and reasoning items are served here, got {}", shown(other)))),
        }
    }
    Ok(out)
}

/// The (valid) input as items with types and ids, as `input_items` lists them.
fn items_of(input: &Value) -> Vec<Value> {
    let items = match input {
        Value::String(s) => vec![json!({"type": "message", "role": "user", "content": [{"type": "input_text", "text": s}]})],
        Value::Array(items) => items.clone(),
        _ => Vec::new(),
    };
    items
        .into_iter()
        .map(|mut item| {
            if item.get("type").is_none() {
                item["type"] = json!("message");
            }
            if let (Some("message"), Some(text)) = (item["type"].as_str(), item["content"].as_str().map(str::to_string)) {
                let part = if item["role"] == "assistant" { "output_text" } else { "input_text" };
                item["content"] = json!([{"type": part, "text": text}]);
            }
            if item.get("id").is_none_or(Value::is_null) {
                let prefix = match item["type"].as_str() {
                    Some("function_call") => "fc",
                    Some("function_call_output") => "fco",
                    Some("reasoning") => "rs",
                    _ => "msg",
                };
                item["id"] = json!(format!("{prefix}_{}", uuid::Uuid::new_v4().simple()));
            }
            item
        })
        .collect()
}

fn tools_of(tools: &Value) -> Result<Value, AppError> {
    let Some(list) = tools.as_array() else { return Err(invalid("tools", "tools must be a list")) };
    let mut defs = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        if t["type"].as_str() != Some("function") {
            return Err(invalid(&format!("tools.{i}.type"), format!("only function tools are served here, got {}", shown(t["type"].as_str()))));
        }
        let mut f = Map::new();
        for k in ["name", "description", "parameters", "strict"] {
            if let Some(v) = t.get(k).filter(|v| !v.is_null()) {
                f.insert(k.into(), v.clone());
            }
        }
        defs.push(json!({"type": "function", "function": f}));
    }
    Ok(Value::Array(defs))
}

fn tool_choice_of(tc: &Value) -> Result<Value, AppError> {
    match (tc.as_str(), tc["type"].as_str()) {
        (Some("auto" | "none" | "required"), _) => Ok(tc.clone()),
        (None, Some("function")) => Ok(json!({"type": "function", "function": {"name": tc["name"]}})),
        (s, t) => Err(invalid("tool_choice", format!("tool_choice must be auto, none, required or a function, got {}", shown(s.or(t))))),
    }
}

/// `text.format` as chat's `response_format`.
fn format_of(text: &Value) -> Result<Option<Value>, AppError> {
    let f = &text["format"];
    match f["type"].as_str() {
        None if f.is_null() => Ok(None),
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(json!({"type": "json_object"}))),
        Some("json_schema") => {
            let mut s = Map::new();
            for k in ["name", "description", "schema", "strict"] {
                if let Some(v) = f.get(k).filter(|v| !v.is_null()) {
                    s.insert(k.into(), v.clone());
                }
            }
            Ok(Some(json!({"type": "json_schema", "json_schema": s})))
        }
        other => Err(invalid("text.format.type", format!("text.format.type must be text, json_object or json_schema, got {}", shown(other)))),
    }
}

/// A validated Responses request, before its earlier conversation (if any) is looked up.
struct Parsed {
    /// The chat request's fields but its messages.
    chat: Map<String, Value>,
    instructions: Option<String>,
    input: Vec<Value>,
    /// The input as items with ids (a string input is one user message).
    input_items: Vec<Value>,
    previous: Option<String>,
    store: bool,
    /// The response object as it starts: the request's settings echoed, no output yet.
    skeleton: Value,
    /// The body's hash, which the receipt names.
    sha256: [u8; 32],
}

/// What each typed field of a request must be (a wrong type is refused, never read as absent:
/// `"store": "no"` must not keep the conversation).
const FIELD_TYPES: [(&str, fn(&Value) -> bool, &str); 17] = [
    ("stream", Value::is_boolean, "a boolean"),
    ("store", Value::is_boolean, "a boolean"),
    ("parallel_tool_calls", Value::is_boolean, "a boolean"),
    ("temperature", Value::is_number, "a number"),
    ("top_p", Value::is_number, "a number"),
    ("max_output_tokens", is_whole, "a whole number"),
    ("top_logprobs", is_whole, "a whole number"),
    ("max_tool_calls", is_whole, "a whole number"),
    ("user", Value::is_string, "a string"),
    ("safety_identifier", Value::is_string, "a string"),
    ("prompt_cache_key", Value::is_string, "a string"),
    ("metadata", is_metadata, "an object of at most 16 strings (keys up to 64 characters, values up to 512), as OpenAI's"),
    ("include", is_string_list, "a list of strings"),
    ("text", Value::is_object, "an object"),
    ("reasoning", Value::is_object, "an object"),
    ("tools", Value::is_array, "a list"),
    ("truncation", is_truncation, "\"auto\" or \"disabled\""),
];

fn is_whole(v: &Value) -> bool {
    v.is_i64() || v.is_u64()
}

/// OpenAI's bounds on `metadata`, which a response echoes (and a node keeps for replays and
/// `previous_response_id`): 16 pairs, keys of 64 characters, values of 512.
fn is_metadata(v: &Value) -> bool {
    v.as_object().is_some_and(|m| {
        m.len() <= 16 && m.iter().all(|(k, v)| k.chars().count() <= 64 && v.as_str().is_some_and(|s| s.chars().count() <= 512))
    })
}

fn is_string_list(v: &Value) -> bool {
    v.as_array().is_some_and(|a| a.iter().all(Value::is_string))
}

fn is_truncation(v: &Value) -> bool {
    matches!(v.as_str(), Some("auto" | "disabled"))
}

fn parse(body: &Value, sha256: [u8; 32]) -> Result<Parsed, AppError> {
    let o = body.as_object().ok_or_else(|| AppError::invalid("the body must be a JSON object", None))?;
    let field = |k: &str| o.get(k).filter(|v| !v.is_null());
    for (k, ok, what) in FIELD_TYPES {
        if let Some(v) = field(k).filter(|v| !ok(v)) {
            return Err(AppError { code: Some("invalid_type"), ..AppError::invalid(format!("{k} must be {what}, got {v}"), Some(k)) });
        }
    }
    if let Some(n) = field("top_logprobs").and_then(Value::as_i64).filter(|n| !(0..=20).contains(n)) {
        return Err(invalid("top_logprobs", format!("top_logprobs must be between 0 and 20, got {n}")));
    }
    let model = match field("model") {
        None | Some(Value::Null) => return Err(invalid("model", "model: field required")),
        Some(v) => v.as_str().ok_or_else(|| AppError { code: Some("invalid_type"), ..invalid("model", format!("model must be a string, got {v}")) })?,
    };
    for (k, what) in [("background", "background responses"), ("conversation", "conversations"), ("prompt", "prompt templates")] {
        if field(k).is_some_and(|v| v != &json!(false)) {
            return Err(invalid(k, format!("{what} are not served by this node")));
        }
    }
    let instructions = match field("instructions") {
        None => None,
        Some(v) => Some(v.as_str().ok_or_else(|| invalid("instructions", "instructions must be a string"))?.to_string()),
    };
    let input = input_messages(o.get("input").unwrap_or(&Value::Null))?;
    let input_items = items_of(o.get("input").unwrap_or(&Value::Null));
    let mut chat = Map::new();
    chat.insert("model".into(), json!(model));
    for (from, to) in [("max_output_tokens", "max_tokens"), ("temperature", "temperature"), ("top_p", "top_p"), ("parallel_tool_calls", "parallel_tool_calls"), ("user", "user")] {
        if let Some(v) = field(from) {
            chat.insert(to.into(), v.clone());
        }
    }
    if let Some(t) = field("tools") {
        chat.insert("tools".into(), tools_of(t)?);
    }
    if let Some(tc) = field("tool_choice") {
        chat.insert("tool_choice".into(), tool_choice_of(tc)?);
    }
    if let Some(f) = field("text").map(format_of).transpose()?.flatten() {
        chat.insert("response_format".into(), f);
    }
    if let Some(e) = field("reasoning").and_then(|r| r.get("effort")).filter(|e| !e.is_null()) {
        chat.insert("reasoning_effort".into(), e.clone());
    }
    let include: Vec<&str> = field("include").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str).collect();
    if include.contains(&"message.output_text.logprobs") {
        chat.insert("logprobs".into(), json!(true));
        if let Some(n) = field("top_logprobs") {
            chat.insert("top_logprobs".into(), n.clone());
        }
    }
    let stream = field("stream").and_then(Value::as_bool) == Some(true);
    if stream {
        chat.insert("stream".into(), json!(true));
        chat.insert("stream_options".into(), json!({"include_usage": true}));
    }
    let store = field("store").and_then(Value::as_bool).unwrap_or(true);
    let previous = match field("previous_response_id") {
        None => None,
        Some(v) => Some(v.as_str().ok_or_else(|| invalid("previous_response_id", "previous_response_id must be a string"))?.to_string()),
    };
    let echo = |k: &str, default: Value| field(k).cloned().unwrap_or(default);
    let skeleton = json!({
        "id": null, "object": "response", "created_at": routes::now_s(), "status": "in_progress",
        "background": false, "error": null, "incomplete_details": null,
        "instructions": instructions, "max_output_tokens": echo("max_output_tokens", Value::Null),
        "model": model, "output": [], "parallel_tool_calls": echo("parallel_tool_calls", json!(true)),
        "previous_response_id": previous,
        "reasoning": {"effort": field("reasoning").map_or(Value::Null, |r| r["effort"].clone()), "summary": null},
        "service_tier": "default", "store": store,
        "temperature": echo("temperature", json!(1.0)), "top_p": echo("top_p", json!(1.0)),
        "text": {"format": field("text").map_or(json!({"type": "text"}), |t| if t["format"].is_null() { json!({"type": "text"}) } else { t["format"].clone() })},
        "tool_choice": echo("tool_choice", json!("auto")), "tools": echo("tools", json!([])),
        "truncation": echo("truncation", json!("disabled")), "usage": null, "top_logprobs": echo("top_logprobs", json!(0)),
        "user": echo("user", Value::Null), "metadata": echo("metadata", json!({})),
    });
    Ok(Parsed { chat, instructions, input, input_items, previous, store, skeleton, sha256 })
}

pub async fn create(State(state): State<AppState>, headers: HeaderMap, body: HashedJson<Value>) -> Result<Response, AppError> {
    let parsed = parse(&body.value, body.sha256)?;
    let g = match routes::gate(&state, &headers, "/v1/responses", body.sha256).await? {
        Ok(g) => g,
        Err(replay) => return Ok(replay),
    };
    routes::run_remembered(&state, g, parsed, |s, g, p| Box::pin(run(s, g, p))).await
}

/// The chat request a Responses request stands for, and the conversation it continues with its
/// input (without instructions, which are not carried over).
async fn chat_request(state: &AppState, owner: Option<AccountId>, p: &mut Parsed) -> Result<(ChatRequest, Vec<Value>, bytes::Bytes), AppError> {
    if p.input.is_empty() {
        // (With previous_response_id the conversation would end in the last answer, which the
        // model would go on writing, as after a prefill, rather than answer a new turn.)
        return Err(invalid("input", "input must hold at least one item: the next turn of the conversation"));
    }
    let mut history = match &p.previous {
        None => Vec::new(),
        Some(id) => {
            let prev = state.responses.get(id, owner).await?.ok_or_else(|| invalid("previous_response_id", format!("Previous response with id '{id}' not found.")))?;
            prev.history.clone()
        }
    };
    history.append(&mut p.input);
    pair_calls(&history)?;
    let mut chat = std::mem::take(&mut p.chat);
    let system = p.instructions.take().map(|t| json!({"role": "system", "content": t}));
    chat.insert("messages".into(), Value::Array(system.into_iter().chain(history.iter().cloned()).collect()));
    let chat = Value::Object(chat);
    // (Forwarded as is when an upstream serves the model: kept only where there are upstreams.)
    let raw = match state.upstreams {
        Some(_) => serde_json::to_vec(&chat).unwrap_or_default().into(),
        None => bytes::Bytes::new(),
    };
    let req: ChatRequest = serde_json::from_value(chat).map_err(|e| AppError::invalid(format!("invalid request: {e}"), None))?;
    Ok((req, history, raw))
}

/// `POST /v1/responses/input_tokens`: the prompt's tokens as `POST /v1/responses` would render
/// the same body (its earlier conversation and tools included).
pub async fn input_tokens(State(state): State<AppState>, headers: HeaderMap, body: HashedJson<Value>) -> Result<Json<Value>, AppError> {
    let owner = crate::charge::caller(&state, &headers).await?.map(|p| p.account);
    let mut p = parse(&body.value, body.sha256)?;
    let (chat, _, _) = chat_request(&state, owner, &mut p).await?;
    crate::proxy::not_forwarded(&state, &chat.common.model, "/v1/responses/input_tokens")?;
    let messages = crate::openai::chat_messages(&chat.messages).map_err(in_responses_terms)?;
    let tools = crate::openai::tools(chat.tools.as_ref(), chat.tool_choice.as_ref())?;
    let active = tools.filter(|t| t.choice != crate::openai::ToolChoice::None);
    let defs: &[Value] = active.as_ref().map_or(&[], |t| &t.defs);
    let n = crate::routes::blocking(|| state.backend.render_chat(&chat.common.model, &messages, defs))?.tokens.len();
    Ok(Json(json!({"object": "response.input_tokens", "input_tokens": n})))
}

async fn run(state: &AppState, g: &routes::Gate, mut p: Parsed) -> Result<Response, AppError> {
    let owner = g.caller.as_ref().map(|c| c.account);
    let (req, history, raw) = chat_request(state, owner, &mut p).await?;
    let keep = p.store.then(|| Keep { store: state.responses.clone(), owner, history, input_items: std::mem::take(&mut p.input_items) });
    if crate::proxy::routes_here(state, &req.common.model, 1) {
        return proxied(state, g, p, raw, keep).await;
    }
    // The receipt names the Responses body (as sent), not its chat translation.
    let r = match routes::chat_run(state, g, HashedJson { value: req, sha256: p.sha256, raw: raw.clone() }).await {
        // The local queue filled up meanwhile: an upstream serving the model takes it.
        Err(e) if crate::proxy::overflows(state, &e, &raw) => return proxied(state, g, p, raw, keep).await,
        r => r.map_err(in_responses_terms)?,
    };
    let rid = r.started.request_id.clone();
    let mut skeleton = p.skeleton;
    skeleton["id"] = json!(format!("resp_{}", r.id.trim_start_matches("chatcmpl-")));
    if r.stream {
        let events = events(routes::chat_stream(r.started, r.id, true, r.post, None), skeleton, keep);
        let resp = Sse::new(events).into_response();
        return Ok(routes::billed_headers(resp, &rid, r.receipt_id.as_deref(), &g.allowance_now(state).await));
    }
    let (Json(v), receipt_id) = routes::chat_body(r.started, r.id, &r.post).await?;
    let response = finished(skeleton, &v["choices"][0], output_of(&v["choices"][0], &response_suffix(&v)), &v["usage"], &v["receipt"]);
    if let Some(k) = keep {
        k.put(&response).await;
    }
    Ok(routes::billed_headers(Json(response).into_response(), &rid, receipt_id.as_deref(), &g.allowance_now(state).await))
}

/// A response answered by an upstream: its chat answer translated (and kept) as a local one is.
async fn proxied(state: &AppState, g: &routes::Gate, p: Parsed, raw: bytes::Bytes, keep: Option<Keep>) -> Result<Response, AppError> {
    let (answer, billed) = crate::proxy::run(state, g, raw, p.sha256, crate::proxy::Endpoint::Chat).await.map_err(in_responses_terms)?;
    let mut skeleton = p.skeleton;
    skeleton["id"] = json!(format!("resp_{}", billed.request_id));
    let resp = match answer {
        crate::proxy::ProxyAnswer::Stream(chunks) => Sse::new(events(chunks, skeleton, keep)).into_response(),
        crate::proxy::ProxyAnswer::Whole(v) => {
            let response = finished(skeleton, &v["choices"][0], output_of(&v["choices"][0], &response_suffix(&v)), &v["usage"], &v["receipt"]);
            if let Some(k) = keep {
                k.put(&response).await;
            }
            Json(response).into_response()
        }
    };
    Ok(billed.respond(state, g, resp).await)
}

/// Each function call answered by one output, before anything else is said, as OpenAI
/// requires (`system` and `developer` messages may come between).
fn pair_calls(history: &[Value]) -> Result<(), AppError> {
    let mut open: Vec<&str> = Vec::new();
    for m in history {
        match m["role"].as_str() {
            Some("tool") => {
                let id = m["tool_call_id"].as_str().unwrap_or_default();
                let i = open.iter().position(|c| *c == id).ok_or_else(|| invalid("input", format!("No tool call found for function call output with call_id {id}.")))?;
                open.remove(i);
            }
            Some("system" | "developer") => {}
            _ => {
                if let Some(id) = open.first() {
                    return Err(invalid("input", format!("No tool output found for function call {id}.")));
                }
                open = m["tool_calls"].as_array().into_iter().flatten().filter_map(|c| c["id"].as_str()).collect();
            }
        }
    }
    match open.first() {
        Some(id) => Err(invalid("input", format!("No tool output found for function call {id}."))),
        None => Ok(()),
    }
}

/// An error of the chat pipeline in the Responses API's names (`max_output_tokens`,
/// `text.format`, `input`, a tool's `name`).
fn in_responses_terms(mut e: AppError) -> AppError {
    const NAMES: [(&str, &str); 7] = [
        ("max_completion_tokens", "max_output_tokens"),
        ("max_tokens", "max_output_tokens"),
        ("response_format", "text.format"),
        ("text.format.json_schema.", "text.format."),
        ("reasoning_effort", "reasoning.effort"),
        ("tool_call_id", "call_id"),
        (".function.", "."),
    ];
    let rename = |s: &str| NAMES.iter().fold(s.to_string(), |s, (from, to)| s.replace(from, to));
    e.message = rename(&e.message).replace("messages", "input");
    e.param = e.param.map(|p| if p.starts_with("messages") { "input".into() } else { rename(&p) });
    e
}

/// Where a finished response goes to be continued.
struct Keep {
    store: Arc<ResponseStore>,
    owner: Option<AccountId>,
    history: Vec<Value>,
    /// This request's input, as `GET /v1/responses/{id}/input_items` lists it.
    input_items: Vec<Value>,
}

impl Keep {
    /// Keeps the conversation with the response's answer as its last assistant turn.
    async fn put(mut self, response: &Value) {
        let (mut text, mut calls) = (String::new(), Vec::new());
        for item in response["output"].as_array().into_iter().flatten() {
            match item["type"].as_str() {
                Some("message") => item["content"].as_array().into_iter().flatten().for_each(|c| text.push_str(c["text"].as_str().unwrap_or_default())),
                Some("function_call") => calls.push(json!({"id": item["call_id"], "type": "function", "function": {"name": item["name"], "arguments": item["arguments"]}})),
                _ => {}
            }
        }
        let mut turn = json!({"role": "assistant", "content": text});
        if !calls.is_empty() {
            turn["tool_calls"] = Value::Array(calls);
        }
        self.history.push(turn);
        self.store.put(self.owner, self.history, self.input_items, response.clone()).await;
    }
}

/// The id suffix shared by a response's items (its chat completion's).
fn response_suffix(chat: &Value) -> String {
    chat["id"].as_str().unwrap_or_default().trim_start_matches("chatcmpl-").to_string()
}

fn fc_id(call_id: &str) -> String {
    format!("fc_{}", call_id.trim_start_matches("call_"))
}

fn reasoning_item(suffix: &str, text: &str) -> Value {
    json!({"type": "reasoning", "id": format!("rs_{suffix}"), "summary": [], "content": [{"type": "reasoning_text", "text": text}]})
}

fn message_item(suffix: &str, text: &str, logprobs: Value) -> Value {
    json!({"type": "message", "id": format!("msg_{suffix}"), "status": "completed", "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}]})
}

fn call_item(call_id: &str, name: &Value, arguments: &str) -> Value {
    json!({"type": "function_call", "id": fc_id(call_id), "call_id": call_id, "name": name, "arguments": arguments, "status": "completed"})
}

/// A chat choice's message as output items.
fn output_of(choice: &Value, suffix: &str) -> Vec<Value> {
    let m = &choice["message"];
    let mut out = Vec::new();
    if let Some(t) = m["reasoning_content"].as_str().filter(|t| !t.is_empty()) {
        out.push(reasoning_item(suffix, t));
    }
    let calls = m["tool_calls"].as_array().map_or(&[][..], Vec::as_slice);
    let text = m["content"].as_str().unwrap_or_default();
    if !text.is_empty() || calls.is_empty() {
        out.push(message_item(suffix, text, choice["logprobs"]["content"].as_array().map_or(json!([]), |l| json!(l))));
    }
    for c in calls {
        out.push(call_item(c["id"].as_str().unwrap_or_default(), &c["function"]["name"], c["function"]["arguments"].as_str().unwrap_or("{}")));
    }
    out
}

fn usage_of(u: &Value) -> Value {
    let input = u["prompt_tokens"].as_u64().unwrap_or(0);
    let output = u["completion_tokens"].as_u64().unwrap_or(0);
    json!({
        "input_tokens": input,
        // (Nothing is written to a cache at a price of its own here: `cache_write_tokens` is 0.)
        "input_tokens_details": {"cached_tokens": u["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or(0), "cache_write_tokens": 0},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": u["completion_tokens_details"]["reasoning_tokens"].as_u64().unwrap_or(0)},
        "total_tokens": input + output,
    })
}

/// The response's status and why it is incomplete, from the chat choice's `finish_reason`.
fn status_of(choice: &Value) -> (&'static str, Value) {
    match choice["finish_reason"].as_str() {
        Some("length") => ("incomplete", json!({"reason": "max_output_tokens"})),
        // Cut by the node (a shutdown): what was written is billed and returned.
        Some("abort") => ("incomplete", json!({"reason": "interrupted"})),
        _ => ("completed", Value::Null),
    }
}

/// The finished response object.
fn finished(mut r: Value, choice: &Value, mut output: Vec<Value>, usage: &Value, receipt: &Value) -> Value {
    let (status, details) = status_of(choice);
    if let (Some(last), "incomplete") = (output.last_mut(), status) {
        last["status"] = json!("incomplete");
    }
    r["status"] = json!(status);
    r["incomplete_details"] = details;
    r["output"] = Value::Array(output);
    r["usage"] = usage_of(usage);
    r["completed_at"] = json!(routes::now_s());
    if !receipt.is_null() {
        r["receipt"] = receipt.clone();
    }
    r
}

/// The output item being streamed.
enum Open {
    Reasoning(String),
    Message { text: String, logprobs: Vec<Value> },
    Call { call_id: String, name: Value, arguments: String },
}

/// Translates chat chunks into Responses events.
struct StreamState {
    response: Value,
    suffix: String,
    seq: u64,
    started: bool,
    output: Vec<Value>,
    open: Option<Open>,
    finish: Value,
    keep: Option<Keep>,
    /// The finished response, to keep before its last event is sent.
    to_keep: Option<(Keep, Value)>,
    /// A `response.failed` was sent: the stream ends there.
    failed: bool,
}

impl StreamState {
    fn ev(&mut self, kind: &str, mut data: Value) -> SseEvent {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(self.seq);
        self.seq += 1;
        SseEvent::default().event(kind).data(data.to_string())
    }

    fn index(&self) -> usize {
        self.output.len()
    }

    fn item_id(&self) -> String {
        match &self.open {
            Some(Open::Reasoning(_)) => format!("rs_{}", self.suffix),
            Some(Open::Message { .. }) => format!("msg_{}", self.suffix),
            Some(Open::Call { call_id, .. }) => fc_id(call_id),
            None => String::new(),
        }
    }

    /// Ends the open item; `status` is the item's (`incomplete` for the last of a cut answer).
    fn close(&mut self, status: &str, out: &mut Vec<SseEvent>) {
        let id = self.item_id();
        let i = self.index();
        let mut item = match self.open.take() {
            None => return,
            Some(Open::Reasoning(text)) => {
                out.push(self.ev("response.reasoning_text.done", json!({"item_id": id, "output_index": i, "content_index": 0, "text": text})));
                reasoning_item(&self.suffix, &text)
            }
            Some(Open::Message { text, logprobs }) => {
                let part = json!({"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs});
                out.push(self.ev("response.output_text.done", json!({"item_id": id, "output_index": i, "content_index": 0, "text": text, "logprobs": logprobs})));
                out.push(self.ev("response.content_part.done", json!({"item_id": id, "output_index": i, "content_index": 0, "part": part})));
                message_item(&self.suffix, &text, json!(logprobs))
            }
            Some(Open::Call { call_id, name, arguments }) => {
                out.push(self.ev("response.function_call_arguments.done", json!({"item_id": id, "output_index": i, "name": name, "arguments": arguments})));
                call_item(&call_id, &name, &arguments)
            }
        };
        item["status"] = json!(status);
        out.push(self.ev("response.output_item.done", json!({"output_index": i, "item": item})));
        self.output.push(item);
    }

    /// Opens a new item (closing the one before).
    fn open(&mut self, next: Open, out: &mut Vec<SseEvent>) {
        self.close("completed", out);
        self.open = Some(next);
        let (id, i) = (self.item_id(), self.index());
        let item = match self.open.as_ref().expect("just opened") {
            Open::Reasoning(_) => json!({"type": "reasoning", "id": id, "summary": [], "content": []}),
            Open::Message { .. } => json!({"type": "message", "id": id, "status": "in_progress", "role": "assistant", "content": []}),
            Open::Call { call_id, name, .. } => json!({"type": "function_call", "id": id, "call_id": call_id, "name": name, "arguments": "", "status": "in_progress"}),
        };
        out.push(self.ev("response.output_item.added", json!({"output_index": i, "item": item})));
        if matches!(self.open, Some(Open::Message { .. })) {
            out.push(self.ev("response.content_part.added", json!({"item_id": id, "output_index": i, "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}})));
        }
    }

    fn chunk(&mut self, c: &Value) -> Vec<SseEvent> {
        let mut out = Vec::new();
        if self.failed {
            return out;
        }
        if !self.started {
            self.started = true;
            let r = self.response.clone();
            out.push(self.ev("response.created", json!({"response": r})));
            out.push(self.ev("response.in_progress", json!({"response": r})));
        }
        if c.get("error").is_some() {
            self.failed = true;
            let mut r = self.response.clone();
            r["status"] = json!("failed");
            r["error"] = json!({"code": "server_error", "message": c["error"]["message"]});
            out.push(self.ev("response.failed", json!({"response": r})));
            return out;
        }
        let choice = &c["choices"][0];
        let delta = &choice["delta"];
        if let Some(t) = delta["reasoning_content"].as_str().filter(|t| !t.is_empty()) {
            if !matches!(self.open, Some(Open::Reasoning(_))) {
                self.open(Open::Reasoning(String::new()), &mut out);
            }
            if let Some(Open::Reasoning(all)) = &mut self.open {
                all.push_str(t);
            }
            let (id, i) = (self.item_id(), self.index());
            out.push(self.ev("response.reasoning_text.delta", json!({"item_id": id, "output_index": i, "content_index": 0, "delta": t})));
        }
        let logprobs: Vec<Value> = choice["logprobs"]["content"].as_array().cloned().unwrap_or_default();
        if let Some(t) = delta["content"].as_str().filter(|t| !t.is_empty()) {
            if !matches!(self.open, Some(Open::Message { .. })) {
                self.open(Open::Message { text: String::new(), logprobs: Vec::new() }, &mut out);
            }
            if let Some(Open::Message { text, logprobs: all }) = &mut self.open {
                text.push_str(t);
                all.extend(logprobs.iter().cloned());
            }
            let (id, i) = (self.item_id(), self.index());
            out.push(self.ev("response.output_text.delta", json!({"item_id": id, "output_index": i, "content_index": 0, "delta": t, "logprobs": logprobs})));
        }
        for tc in delta["tool_calls"].as_array().into_iter().flatten() {
            if let Some(call_id) = tc["id"].as_str() {
                self.open(Open::Call { call_id: call_id.to_string(), name: tc["function"]["name"].clone(), arguments: String::new() }, &mut out);
            }
            if let Some(a) = tc["function"]["arguments"].as_str().filter(|a| !a.is_empty()) {
                if let Some(Open::Call { arguments, .. }) = &mut self.open {
                    arguments.push_str(a);
                }
                let (id, i) = (self.item_id(), self.index());
                out.push(self.ev("response.function_call_arguments.delta", json!({"item_id": id, "output_index": i, "delta": a})));
            }
        }
        if choice["finish_reason"].is_string() {
            self.finish = choice.clone();
        }
        if c["usage"].is_object() {
            self.end(c, &mut out);
        }
        out
    }

    /// The last chunk (usage, and the receipt): the last item closes and the response ends.
    fn end(&mut self, c: &Value, out: &mut Vec<SseEvent>) {
        let (status, _) = status_of(&self.finish);
        if self.open.is_none() && self.output.is_empty() {
            // An answer of no text at all is still one (empty) message, as the body's is.
            self.open(Open::Message { text: String::new(), logprobs: Vec::new() }, out);
        }
        self.close(if status == "incomplete" { "incomplete" } else { "completed" }, out);
        let r = finished(self.response.clone(), &self.finish, std::mem::take(&mut self.output), &c["usage"], &c["receipt"]);
        // Kept before the last event goes out (see `events`): a client that sends the next turn
        // at once finds it.
        self.to_keep = self.keep.take().map(|k| (k, r.clone()));
        let kind = if status == "incomplete" { "response.incomplete" } else { "response.completed" };
        out.push(self.ev(kind, json!({"response": r})));
    }
}

fn events(chunks: impl Stream<Item = Value> + Send + 'static, skeleton: Value, keep: Option<Keep>) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let mut st = StreamState { response: skeleton, suffix: String::new(), seq: 0, started: false, output: Vec::new(), open: None, finish: Value::Null, keep, to_keep: None, failed: false };
    st.suffix = st.response["id"].as_str().unwrap_or_default().trim_start_matches("resp_").to_string();
    chunks
        .then(move |c| {
            let out = st.chunk(&c);
            let to_keep = st.to_keep.take();
            async move {
                if let Some((k, r)) = to_keep {
                    k.put(&r).await;
                }
                stream::iter(out)
            }
        })
        .flatten()
        .map(Ok)
}

#[derive(Debug, serde::Deserialize)]
pub struct GetQuery {
    stream: Option<String>,
}

/// `GET /v1/responses/{id}`: a kept response, to the account that asked for it. Its events are
/// not replayed (`stream=true`, for background responses, which are not served): a `400`,
/// rather than a JSON body that an SDK reading events would find empty.
pub async fn get(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    crate::routes::ApiQuery(q): crate::routes::ApiQuery<GetQuery>,
) -> Result<Json<Value>, AppError> {
    if q.stream.as_deref().is_some_and(|s| s != "false") {
        return Err(invalid("stream", "a kept response's events are not replayed: GET it without stream"));
    }
    let r = kept(&state, &headers, &id).await?;
    Ok(Json(r.response.clone()))
}

/// The caller's kept response `id`, or a 404 (another account's is not found either).
async fn kept(state: &AppState, headers: &HeaderMap, id: &str) -> Result<Arc<Stored>, AppError> {
    let caller = crate::charge::caller(state, headers).await?.map(|p| p.account);
    state.responses.get(id, caller).await?.ok_or_else(|| AppError::not_found(format!("Response with id '{id}' not found.")))
}

#[derive(Debug, serde::Deserialize)]
pub struct ItemsQuery {
    after: Option<String>,
    limit: Option<usize>,
    order: Option<String>,
}

/// `GET /v1/responses/{id}/input_items`: a kept response's input, newest first by default.
pub async fn input_items(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    crate::routes::ApiQuery(q): crate::routes::ApiQuery<ItemsQuery>,
) -> Result<Json<Value>, AppError> {
    let r = kept(&state, &headers, &id).await?;
    let limit = q.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(invalid("limit", format!("limit must be between 1 and 100, got {limit}")));
    }
    let mut items: Vec<&Value> = r.input_items.iter().collect();
    match q.order.as_deref() {
        None | Some("desc") => items.reverse(),
        Some("asc") => {}
        Some(o) => return Err(invalid("order", format!("order must be asc or desc, got {o:?}"))),
    }
    if let Some(after) = &q.after {
        let i = items.iter().position(|it| it["id"].as_str() == Some(after.as_str())).ok_or_else(|| invalid("after", format!("no input item {after:?} in this response")))?;
        items.drain(..=i);
    }
    let has_more = items.len() > limit;
    items.truncate(limit);
    Ok(Json(json!({
        "object": "list", "data": items, "has_more": has_more,
        "first_id": items.first().map(|i| i["id"].clone()), "last_id": items.last().map(|i| i["id"].clone()),
    })))
}

/// `DELETE /v1/responses/{id}`.
pub async fn delete(State(state): State<AppState>, headers: HeaderMap, Path(id): Path<String>) -> Result<Json<Value>, AppError> {
    let caller = crate::charge::caller(&state, &headers).await?.map(|p| p.account);
    if !state.responses.delete(&id, caller).await? {
        return Err(AppError::not_found(format!("Response with id '{id}' not found.")));
    }
    Ok(Json(json!({"id": id, "object": "response", "deleted": true})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_become_chat_turns() {
        let input = json!([
            {"role": "user", "content": "Weather in Paris?"},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me look."}]},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"},
            {"type": "function_call", "call_id": "call_2", "name": "get_weather", "arguments": "{\"city\":\"Lyon\"}"},
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"type": "function_call_output", "call_id": "call_1", "output": "18 C"},
            {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "20 C"}]},
        ]);
        let m = input_messages(&input).unwrap();
        assert_eq!(m.len(), 4);
        assert_eq!(m[1]["content"], "Let me look.");
        assert_eq!(m[1]["tool_calls"].as_array().unwrap().len(), 2);
        assert_eq!(m[3], json!({"role": "tool", "tool_call_id": "call_2", "content": "20 C"}));
        let e = input_messages(&json!([{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}])).unwrap_err();
        assert!(e.message.contains("only text"), "{}", e.message);
    }

    #[test]
    fn a_stream_translates_text_and_calls_into_indexed_items() {
        let mut st = StreamState { response: json!({"id": "resp_1"}), suffix: "1".into(), seq: 0, started: false, output: Vec::new(), open: None, finish: Value::Null, keep: None, to_keep: None, failed: false };
        let kinds = |evs: Vec<SseEvent>| evs.iter().map(|e| format!("{e:?}")).collect::<Vec<_>>();
        let mut all = kinds(st.chunk(&json!({"choices": [{"delta": {"role": "assistant", "content": ""}}]})));
        all.extend(kinds(st.chunk(&json!({"choices": [{"delta": {"content": "Hi"}}]}))));
        all.extend(kinds(st.chunk(&json!({"choices": [{"delta": {"tool_calls": [{"index": 0, "id": "call_9", "function": {"name": "f", "arguments": ""}}]}}]}))));
        all.extend(kinds(st.chunk(&json!({"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}}]}))));
        all.extend(kinds(st.chunk(&json!({"choices": [{"delta": {}, "finish_reason": "tool_calls"}]}))));
        all.extend(kinds(st.chunk(&json!({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}))));
        let names: Vec<&str> = all.iter().map(|e| e.split("event: ").nth(1).unwrap_or("").split('\\').next().unwrap_or("")).collect();
        expect_test::expect![[r#"
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.completed",
            ]
        "#]]
        .assert_debug_eq(&names);
        assert!(all[9].contains(r#"\"output_index\":1"#), "the call is the second item: {}", all[9]);
        assert!(all[12].contains(r#"\"total_tokens\":5"#), "{}", all[12]);
    }

    #[tokio::test]
    async fn the_store_is_bounded_and_scoped_to_its_account() {
        let s = ResponseStore::default();
        let a = Some(AccountId(1));
        s.put(a, vec![json!({"role": "user", "content": "x"})], Vec::new(), json!({"id": "resp_a"})).await;
        assert!(s.get("resp_a", a).await.unwrap().is_some());
        assert!(s.get("resp_a", Some(AccountId(2))).await.unwrap().is_none());
        assert!(!s.delete("resp_a", None).await.unwrap());
        for i in 0..RESPONSES_STORED_MAX {
            s.put(None, Vec::new(), Vec::new(), json!({"id": format!("resp_{i}")})).await;
        }
        assert!(s.get("resp_a", a).await.unwrap().is_none(), "the oldest went first");
        assert_eq!(s.inner.lock().unwrap().by_id.len(), RESPONSES_STORED_MAX);
        assert!(s.delete("resp_7", None).await.unwrap() && s.get("resp_7", None).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn one_account_cannot_push_the_others_out() {
        let s = ResponseStore::default();
        let (victim, attacker) = (Some(AccountId(1)), Some(AccountId(2)));
        s.put(victim, Vec::new(), Vec::new(), json!({"id": "resp_victim"})).await;
        for i in 0..RESPONSES_STORED_MAX {
            s.put(attacker, Vec::new(), Vec::new(), json!({"id": format!("resp_{i}")})).await;
        }
        assert!(s.get("resp_victim", victim).await.unwrap().is_some(), "kept: the attacker's own oldest went instead");
        let g = s.inner.lock().unwrap();
        assert_eq!(g.by_id.values().filter(|r| r.owner == attacker).count(), RESPONSES_STORED_PER_ACCOUNT_MAX);
    }
}
