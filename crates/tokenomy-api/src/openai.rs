//! OpenAI's wire format: request bodies as clients send them, validated into
//! [`tokenomy_core`] types, and the response / chunk shapes clients parse.
//!
//! API Boundary: nothing outside this crate (and, later, the upstream router) sees these types.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokenomy_core::{ChatMessage, LogprobEntry, SamplingParams, TokenId, Usage};

use crate::error::AppError;

/// Requests may ask for at most this many choices.
pub const CHOICES_MAX: u32 = 16;
/// At most this many stop strings (as OpenAI).
pub const STOPS_MAX: usize = 4;
pub const TOP_LOGPROBS_MAX: u8 = 20;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default, deserialize_with = "null_is_default")]
    pub include_usage: bool,
}

/// An explicit `null` reads as the field left out, as OpenAI reads it (the SDKs send `null`
/// for a parameter passed as `None`).
fn null_is_default<'de, D: serde::Deserializer<'de>, T: Default + Deserialize<'de>>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Sampling fields shared by both endpoints.
#[derive(Debug, Default, Deserialize)]
pub struct CommonFields {
    pub model: String,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub repeat_penalty: Option<f32>,
    pub logit_bias: Option<HashMap<String, f32>>,
    pub stop: Option<StopField>,
    pub n: Option<u32>,
    #[serde(default, deserialize_with = "null_is_default")]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub ignore_eos: Option<bool>,
    /// Stop strings allowed: OpenAI's [`STOPS_MAX`] unless the request came through an API
    /// that allows more (Anthropic's `stop_sequences`). Not a wire field.
    #[serde(skip)]
    pub stops_max: Option<usize>,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    #[serde(flatten)]
    pub common: CommonFields,
    pub messages: Vec<WireMessage>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    #[serde(default, deserialize_with = "null_is_default")]
    pub logprobs: bool,
    pub top_logprobs: Option<i64>,
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    pub response_format: Option<Value>,
    /// Where reasoning goes: `reasoning_content` (default), `reasoning`, `both`, or `none`
    /// (no split: the think block stays in `content`).
    pub reasoning_format: Option<String>,
    /// Most tokens the model may spend thinking before its think block is closed for it
    /// (vLLM's name for it).
    pub thinking_token_budget: Option<i64>,
    /// OpenAI's deprecated function calling, refused with a pointer to `tools` rather than
    /// ignored (an answer that could never call a function would look like the model's choice).
    #[serde(default)]
    pub functions: Option<Value>,
    #[serde(default)]
    pub function_call: Option<Value>,
    /// Output modalities: only `["text"]` is served (audio would be silently missing).
    pub modalities: Option<Vec<String>>,
    pub audio: Option<Value>,
    /// Accepted and not acted on (the engine has no reasoning effort), but checked: a typo is
    /// the client's to know.
    pub reasoning_effort: Option<String>,
    /// The search-model option: no web is searched here, so it is refused, not ignored.
    pub web_search_options: Option<Value>,
    /// A hint to answer tersely or at length: accepted and not acted on, but checked.
    pub verbosity: Option<String>,
}

impl ChatRequest {
    /// The fields OpenAI takes that this node cannot honour, refused rather than ignored.
    pub fn unserved(&self) -> Result<(), AppError> {
        if let Some(m) = self.modalities.iter().flatten().find(|m| *m != "text") {
            return Err(AppError::invalid_value("modalities", format!("only text output is served, not {m:?}")));
        }
        if self.audio.as_ref().is_some_and(|a| !a.is_null()) {
            return Err(AppError::invalid_value("audio", "audio output is not served"));
        }
        const EFFORTS: [&str; 7] = ["none", "minimal", "low", "medium", "high", "xhigh", "max"];
        if let Some(e) = self.reasoning_effort.as_deref().filter(|e| !EFFORTS.contains(e)) {
            return Err(AppError::invalid_value("reasoning_effort", format!("reasoning_effort must be one of {EFFORTS:?}, got {e:?}")));
        }
        if self.web_search_options.as_ref().is_some_and(|w| !w.is_null()) {
            return Err(AppError::invalid_value("web_search_options", "web search is not served: the model answers from its weights alone"));
        }
        const VERBOSITIES: [&str; 3] = ["low", "medium", "high"];
        if let Some(v) = self.verbosity.as_deref().filter(|v| !VERBOSITIES.contains(v)) {
            return Err(AppError::invalid_value("verbosity", format!("verbosity must be one of {VERBOSITIES:?}, got {v:?}")));
        }
        Ok(())
    }
}

#[derive(Debug, Deserialize)]
pub struct WireMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<Value>,
    pub tool_calls: Option<Vec<Value>>,
    pub tool_call_id: Option<String>,
    pub name: Option<String>,
}

/// `response_format` as a constraint: `text` (none), `json_object`, or `json_schema`.
pub fn response_format(v: Option<&Value>) -> Result<Option<tokenomy_core::Grammar>, AppError> {
    let Some(v) = v.filter(|v| !v.is_null()) else { return Ok(None) };
    let bad = |m: String| AppError::invalid_value("response_format", m);
    match v["type"].as_str() {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(tokenomy_core::Grammar::JsonSchema(json!({"type": "object"})))),
        Some("json_schema") => {
            let schema = &v["json_schema"]["schema"];
            if !schema.is_object() && !schema.is_boolean() {
                return Err(bad("response_format.json_schema.schema must be a JSON Schema object".into()));
            }
            // Strict or not, an object that leaves `additionalProperties` unsaid gets only the
            // properties it declares: what a caller of structured output means (xgrammar does
            // the same), and small models otherwise add keys of their own. `true` allows more.
            let mut schema = schema.clone();
            closed_objects(&mut schema);
            Ok(Some(tokenomy_core::Grammar::JsonSchema(schema)))
        }
        other => Err(bad(format!("response_format.type must be \"text\", \"json_object\" or \"json_schema\", got {}", shown(other)))),
    }
}

/// OpenAI's strict mode, applied to every constrained schema: an object schema that does not
/// say otherwise allows no properties beyond those it lists (applied recursively).
/// An optional value as an error message shows it: `"xml"`, or `nothing`.
pub(crate) fn shown(v: Option<&str>) -> String {
    v.map_or_else(|| "nothing".to_string(), |s| format!("{s:?}"))
}

/// The JSON type of a value, as an error message names it.
pub(crate) fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

pub fn closed_objects(schema: &mut Value) {
    // A schema that composes objects with `allOf` adds properties to an object from beside it
    // (a sibling branch, a `$ref`'d base): closed, its parts would contradict one another.
    if !composes(schema) {
        close(schema);
    }
}

/// Whether `allOf` appears anywhere in `schema` (literal values aside).
fn composes(schema: &Value) -> bool {
    match schema {
        Value::Object(o) => o.iter().any(|(k, v)| k == "allOf" || (!matches!(k.as_str(), "const" | "enum" | "default" | "examples") && composes(v))),
        Value::Array(a) => a.iter().any(composes),
        _ => false,
    }
}

/// [`closed_objects`] of a schema without `allOf`. An object whose `required` names a
/// property it does not list is left open: closed, it could not be satisfied.
fn close(schema: &mut Value) {
    match schema {
        Value::Object(o) => {
            let is_object = o.get("type") == Some(&json!("object")) || o.contains_key("properties");
            let listed = |name: &Value| name.as_str().is_some_and(|n| o.get("properties").is_some_and(|p| p.get(n).is_some()));
            let lists_required = o.get("required").and_then(Value::as_array).is_none_or(|r| r.iter().all(listed));
            if is_object && lists_required && !o.contains_key("additionalProperties") {
                o.insert("additionalProperties".into(), json!(false));
            }
            // Literal values (`const`, `enum`, `default`, `examples`) are data, not schemas.
            for (k, v) in o.iter_mut() {
                if !matches!(k.as_str(), "const" | "enum" | "default" | "examples") {
                    close(v);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(close),
        _ => {}
    }
}

/// At most this many tools per request.
pub const TOOLS_MAX: usize = 128;

/// What the request asked of tools.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    None,
    Auto,
    Required,
    Named(String),
}

#[derive(Debug, Clone)]
pub struct Tools {
    /// The definitions as the template gets them.
    pub defs: Vec<Value>,
    pub names: Vec<String>,
    pub choice: ToolChoice,
}

fn valid_tool_name(n: &str) -> bool {
    !n.is_empty() && n.len() <= 64 && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Validates `tools` and `tool_choice`; `None` when the request has no tools.
pub fn tools(tools: Option<&Value>, choice: Option<&Value>) -> Result<Option<Tools>, AppError> {
    let Some(tools) = tools.filter(|t| !t.is_null()) else {
        if choice.is_some_and(|c| !c.is_null() && c != "none" && c != "auto") {
            return Err(AppError::invalid_value("tool_choice", "tool_choice needs `tools`"));
        }
        return Ok(None);
    };
    let list = tools.as_array().ok_or_else(|| AppError::invalid_value("tools", "tools must be an array of function definitions"))?;
    if list.len() > TOOLS_MAX {
        return Err(AppError::invalid_value("tools", format!("at most {TOOLS_MAX} tools")));
    }
    if list.is_empty() && choice.is_some_and(|c| !c.is_null() && c != "none" && c != "auto") {
        return Err(AppError::invalid_value("tools", "tools is empty: a required or named tool_choice needs at least one tool"));
    }
    let mut names: Vec<String> = Vec::new();
    for (i, t) in list.iter().enumerate() {
        let param = format!("tools[{i}]");
        if t["type"] != "function" || !t["function"].is_object() {
            return Err(AppError::invalid_value(&param, format!("{param} must be {{\"type\": \"function\", \"function\": {{…}}}}")));
        }
        let f = &t["function"];
        let name = f["name"].as_str().unwrap_or_default();
        if !valid_tool_name(name) {
            return Err(AppError::invalid_value(&param, format!("{param}.function.name must be 1-64 characters of a-z, A-Z, 0-9, _ or -, got {:?}", f["name"])));
        }
        if names.iter().any(|n| n == name) {
            return Err(AppError::invalid_value(&param, format!("two tools are named {name:?}")));
        }
        let params = &f["parameters"];
        if !params.is_null() && (!params.is_object() || params.get("type").is_some_and(|t| t != "object")) {
            return Err(AppError::invalid_value(&param, format!("{param}.function.parameters must be a JSON Schema object with \"type\": \"object\"")));
        }
        names.push(name.to_string());
    }
    let choice = match choice {
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => return Err(AppError::invalid_value("tool_choice", format!("tool_choice must be \"none\", \"auto\", \"required\" or a named function, got {other:?}"))),
        },
        Some(v) => {
            let name = v["function"]["name"].as_str().filter(|_| v["type"] == "function").ok_or_else(|| {
                AppError::invalid_value("tool_choice", "tool_choice must be {\"type\": \"function\", \"function\": {\"name\": …}}")
            })?;
            if !names.iter().any(|n| n == name) {
                return Err(AppError::invalid_value("tool_choice", format!("tool_choice names {name:?}, which is not in tools")));
            }
            ToolChoice::Named(name.to_string())
        }
    };
    Ok(Some(Tools { defs: list.clone(), names, choice }))
}

/// An assistant message's `tool_calls` for the template: arguments as objects.
fn template_tool_calls(calls: &[Value], param: &str) -> Result<Vec<Value>, AppError> {
    calls
        .iter()
        .map(|c| {
            let f = &c["function"];
            let name = f["name"].as_str().ok_or_else(|| AppError::invalid_value(param, format!("{param}.tool_calls needs function.name")))?;
            let args = match &f["arguments"] {
                Value::String(s) => serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.clone())),
                Value::Null => json!({}),
                v => v.clone(),
            };
            Ok(json!({"id": c["id"], "type": "function", "function": {"name": name, "arguments": args}}))
        })
        .collect()
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<TokenId>),
    TokenLists(Vec<Vec<TokenId>>),
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    #[serde(flatten)]
    pub common: CommonFields,
    pub prompt: PromptField,
    pub max_tokens: Option<i64>,
    #[serde(default, deserialize_with = "null_is_default")]
    pub echo: bool,
    pub logprobs: Option<i64>,
    pub suffix: Option<String>,
    /// Served only as `n` (each choice is returned): more candidates than choices is refused.
    pub best_of: Option<i64>,
}

/// Checks ranges and builds the engine's sampling parameters (`max_tokens` is set later).
pub fn sampling(c: &CommonFields) -> Result<SamplingParams, AppError> {
    let mut p = SamplingParams::default();
    p.temperature = range("temperature", c.temperature, 0.0, 2.0)?.unwrap_or(1.0);
    p.top_p = range("top_p", c.top_p, 0.0, 1.0)?.unwrap_or(1.0);
    p.min_p = range("min_p", c.min_p, 0.0, 1.0)?.unwrap_or(0.0);
    p.presence_penalty = range("presence_penalty", c.presence_penalty, -2.0, 2.0)?.unwrap_or(0.0);
    p.frequency_penalty = range("frequency_penalty", c.frequency_penalty, -2.0, 2.0)?.unwrap_or(0.0);
    let rep = c.repetition_penalty.or(c.repeat_penalty);
    p.repetition_penalty = range("repetition_penalty", rep, 0.01, 10.0)?.unwrap_or(1.0);
    p.top_k = match c.top_k {
        None => 0,
        Some(k) if (0..=1_000_000).contains(&k) => k as u32,
        Some(k) => return Err(AppError::invalid_value("top_k", format!("top_k must be between 0 and 1000000, got {k}"))),
    };
    p.seed = c.seed.map(|s| s as u64);
    p.logit_bias = logit_bias(c.logit_bias.as_ref())?;
    p.stop = stops(c.stop.as_ref(), c.stops_max.unwrap_or(STOPS_MAX))?;
    p.ignore_eos = c.ignore_eos.unwrap_or(false);
    Ok(p)
}

fn range(name: &str, v: Option<f32>, lo: f32, hi: f32) -> Result<Option<f32>, AppError> {
    match v {
        Some(x) if !(lo..=hi).contains(&x) || x.is_nan() => {
            Err(AppError::invalid_value(name, format!("{name} must be between {lo} and {hi}, got {x}")))
        }
        other => Ok(other),
    }
}

fn logit_bias(map: Option<&HashMap<String, f32>>) -> Result<Vec<(TokenId, f32)>, AppError> {
    let Some(map) = map else { return Ok(Vec::new()) };
    let mut out = Vec::with_capacity(map.len());
    for (k, &v) in map {
        let t: TokenId = k
            .parse()
            .ok()
            .filter(|t: &TokenId| *t >= 0)
            .ok_or_else(|| AppError::invalid_value("logit_bias", format!("logit_bias keys must be token ids, got {k:?}")))?;
        if !(-100.0..=100.0).contains(&v) {
            return Err(AppError::invalid_value("logit_bias", format!("logit_bias values must be between -100 and 100, got {v}")));
        }
        out.push((t, v));
    }
    out.sort_by_key(|b| b.0);
    Ok(out)
}

fn stops(stop: Option<&StopField>, max: usize) -> Result<Vec<String>, AppError> {
    let list = match stop {
        None => Vec::new(),
        Some(StopField::One(s)) => vec![s.clone()],
        Some(StopField::Many(v)) => v.clone(),
    };
    if list.len() > max {
        return Err(AppError::invalid_value("stop", format!("at most {max} stop sequences are allowed, got {}", list.len())));
    }
    Ok(list.into_iter().filter(|s| !s.is_empty()).collect())
}

pub fn choices(n: Option<u32>) -> Result<u32, AppError> {
    match n.unwrap_or(1) {
        n @ 1..=CHOICES_MAX => Ok(n),
        n => Err(AppError::invalid_value("n", format!("n must be between 1 and {CHOICES_MAX}, got {n}"))),
    }
}

/// `max_tokens` as given (at least `min`): `None` when absent.
pub fn max_tokens(v: Option<i64>, name: &str, min: u32) -> Result<Option<u32>, AppError> {
    match v {
        None => Ok(None),
        Some(x) if (i64::from(min)..=i64::from(u32::MAX)).contains(&x) => Ok(Some(x as u32)),
        Some(x) => Err(AppError::invalid_value(name, format!("{name} must be a whole number of tokens from {min} to {}, got {x}", u32::MAX))),
    }
}

pub fn top_logprobs(v: Option<i64>, name: &str, max: u8) -> Result<u8, AppError> {
    match v {
        None => Ok(0),
        Some(x) if (0..=i64::from(max)).contains(&x) => Ok(x as u8),
        Some(x) => Err(AppError::invalid_value(name, format!("{name} must be between 0 and {max}, got {x}"))),
    }
}

/// Flattens OpenAI message content (a string or a list of text parts) to plain text.
pub fn chat_messages(messages: &[WireMessage]) -> Result<Vec<ChatMessage>, AppError> {
    if messages.is_empty() {
        return Err(AppError::invalid("messages must contain at least one message", Some("messages")));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let param = format!("messages[{i}]");
            if !matches!(m.role.as_str(), "system" | "developer" | "user" | "assistant" | "tool") {
                return Err(AppError::invalid_value(&param, format!("unknown role {:?} in {param}", m.role)));
            }
            let role = if m.role == "developer" { "system".to_string() } else { m.role.clone() };
            let tool_calls = match &m.tool_calls {
                Some(c) if m.role == "assistant" => template_tool_calls(c, &param)?,
                _ => Vec::new(),
            };
            if m.role == "tool" && m.tool_call_id.is_none() && m.name.is_none() {
                return Err(AppError::invalid_value(&param, format!("{param}: a tool message needs tool_call_id")));
            }
            // A tool result answers a call: it follows an assistant message with `tool_calls`
            // (after other results of the same turn, or a system reminder), as OpenAI requires.
            let turn = messages[..i].iter().rev().find(|p| !matches!(p.role.as_str(), "tool" | "system" | "developer"));
            let calls = turn.filter(|p| p.role == "assistant").and_then(|p| p.tool_calls.as_ref()).filter(|c| !c.is_empty());
            match (m.role.as_str(), calls, &m.tool_call_id) {
                ("tool", None, _) => {
                    return Err(AppError::invalid_value(&param, format!("{param}: a tool message must follow an assistant message with tool_calls")));
                }
                ("tool", Some(calls), Some(id)) if !calls.iter().any(|c| c["id"].as_str() == Some(id)) => {
                    let msg = format!("{param}: tool_call_id {id:?} answers none of the tool_calls of the assistant message before it");
                    return Err(AppError::invalid_value(&format!("{param}.tool_call_id"), msg));
                }
                ("user" | "assistant", Some(calls), _) => {
                    if let Some(id) = unanswered(calls, &messages[..i]) {
                        let msg = format!("{param}: the assistant message with tool_calls before it must be followed by tool messages answering each call; tool_call_id {id:?} has none");
                        return Err(AppError::invalid_value(&param, msg));
                    }
                }
                _ => {}
            }
            // Only an assistant's message may go without content (its tool calls say it), as
            // OpenAI has it: a user turn without any is a client's mistake, not an empty turn.
            if m.role != "assistant" && m.content.as_ref().is_none_or(Value::is_null) {
                return Err(AppError::invalid_value(&format!("{param}.content"), format!("{param}: a {} message needs content", m.role)));
            }
            Ok(ChatMessage {
                role,
                content: content_text(m.content.as_ref(), &param, m.role == "assistant")?,
                tool_calls,
                tool_call_id: m.tool_call_id.clone(),
                name: m.name.clone(),
            })
        })
        .collect()
}

/// The first of `calls` (the tool calls of the last assistant turn in `before`) that no tool
/// message after that turn answers, as OpenAI refuses a conversation that goes on without
/// them. (Results named only by function `name`, the legacy form, are not matched by id.)
fn unanswered<'a>(calls: &'a [Value], before: &[WireMessage]) -> Option<&'a str> {
    let results: Vec<&WireMessage> = before.iter().rev().take_while(|p| p.role != "assistant").filter(|p| p.role == "tool").collect();
    if results.iter().any(|r| r.tool_call_id.is_none()) {
        return None;
    }
    calls.iter().filter_map(|c| c["id"].as_str()).find(|id| !results.iter().any(|r| r.tool_call_id.as_deref() == Some(*id)))
}

/// A message's text. An assistant's earlier answer sent back may hold a `refusal` part (what
/// OpenAI's models say when they decline), which is what the assistant said.
fn content_text(content: Option<&Value>, param: &str, assistant: bool) -> Result<String, AppError> {
    match content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for part in parts {
                match (part.get("type").and_then(Value::as_str), part.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    (Some("refusal"), _) if assistant && part.get("refusal").is_some_and(Value::is_string) => {
                        text.push_str(part["refusal"].as_str().unwrap_or_default())
                    }
                    _ => return Err(AppError::invalid_value(param, format!("{param}: only text content parts are supported"))),
                }
            }
            Ok(text)
        }
        Some(_) => Err(AppError::invalid_value(param, format!("{param}.content must be a string or a list of text parts"))),
    }
}

pub fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens(),
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
    })
}

/// One entry of chat `logprobs.content`.
pub fn chat_logprob_json(e: &LogprobEntry) -> Value {
    let top: Vec<Value> = e
        .top
        .iter()
        .map(|t| json!({"token": t.text, "logprob": t.logprob, "bytes": t.bytes}))
        .collect();
    json!({"token": e.chosen.text, "logprob": e.chosen.logprob, "bytes": e.chosen.bytes, "top_logprobs": top})
}

/// The legacy completions `logprobs` object, built up token by token.
#[derive(Debug, Default, Serialize)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<Option<f32>>,
    pub top_logprobs: Vec<Option<HashMap<String, f32>>>,
    pub text_offset: Vec<usize>,
}

impl CompletionLogprobs {
    /// Appends one token; `entry` is `None` for the first prompt token.
    pub fn push(&mut self, text: String, entry: Option<&LogprobEntry>, offset: usize) {
        self.tokens.push(text);
        self.text_offset.push(offset);
        self.token_logprobs.push(entry.map(|e| e.chosen.logprob));
        // The chosen token is always among them, as OpenAI's legacy API has it (up to
        // `logprobs` + 1 entries when it is not one of the most likely).
        let top = |e: &LogprobEntry| e.top.iter().chain([&e.chosen]).map(|t| (t.text.clone(), t.logprob)).collect();
        self.top_logprobs.push(entry.map(top));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_schemas_close_every_object() {
        let mut s = json!({"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "string"}}},
            "c": {"type": "object", "additionalProperties": true}}, "required": ["a"]});
        closed_objects(&mut s);
        assert_eq!(s["additionalProperties"], false);
        assert_eq!(s["properties"]["a"]["additionalProperties"], false);
        assert_eq!(s["properties"]["c"]["additionalProperties"], true, "an explicit choice is kept");
    }

    #[test]
    fn objects_closing_would_make_unsatisfiable_stay_open() {
        let branch = |p: &str| json!({"type": "object", "properties": {p: {"type": "integer"}}, "required": [p]});
        let mut s = json!({"allOf": [branch("a"), branch("b")]});
        closed_objects(&mut s);
        assert_eq!(s, json!({"allOf": [branch("a"), branch("b")]}), "an intersection's branches stay open");
        // A root that allOf extends, and a $ref'd base: the whole composed schema stays open.
        let extended = json!({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"],
            "$defs": {"base": branch("id")}, "allOf": [{"$ref": "#/$defs/base"}, branch("b")]});
        let mut s = extended.clone();
        closed_objects(&mut s);
        assert_eq!(s, extended);
        let mut s = json!({"type": "object", "properties": {}, "required": ["zzz"]});
        closed_objects(&mut s);
        assert_eq!(s.get("additionalProperties"), None, "it requires a property it does not list");
    }

    #[test]
    fn literal_values_in_a_schema_are_left_alone() {
        let lit = json!({"type": "object", "mode": "fast"});
        let mut s = json!({"type": "object", "properties": {"cfg": {"const": lit.clone(), "default": lit.clone()},
            "e": {"enum": [{"properties": 1}]}, "x": {"type": "object", "examples": [lit.clone()]}}});
        closed_objects(&mut s);
        assert_eq!((&s["properties"]["cfg"]["const"], &s["properties"]["cfg"]["default"]), (&lit, &lit));
        assert_eq!(s["properties"]["e"]["enum"][0], json!({"properties": 1}));
        assert_eq!((&s["properties"]["x"]["examples"][0], &s["properties"]["x"]["additionalProperties"]), (&lit, &json!(false)));
    }
}
