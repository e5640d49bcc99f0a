//! Handlers. Each one: parse and validate → start generations on the backend → spawn the
//! metering task → answer as one JSON body or as an SSE stream.

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::stream::{self, Stream, StreamExt};
use serde_json::{json, Value};
use tokenomy_core::{Event, FinishReason, GenerateRequest, LogprobEntry, Outcome, PromptLogprob, SamplingParams, TokenId, Usage};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::openai::{self, ChatRequest, CompletionLogprobs, CompletionRequest, PromptField};
use crate::{AppError, AppState};

/// `Json` whose rejections are OpenAI-shaped errors.
pub struct ApiJson<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, AppError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(r: JsonRejection) -> AppError {
    let status = r.status();
    let detail = r.body_text();
    let message = match &r {
        JsonRejection::MissingJsonContentType(_) => "Expected a JSON body with `Content-Type: application/json`".to_string(),
        _ if status == StatusCode::PAYLOAD_TOO_LARGE => format!("The request body is too large: {detail}"),
        _ => format!("The request body is not valid JSON for this endpoint: {detail}"),
    };
    AppError { status: if status.is_client_error() { status } else { StatusCode::BAD_REQUEST }, ..AppError::invalid(message, None) }
}

fn now_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// One started choice.
struct Choice {
    index: u32,
    events: mpsc::UnboundedReceiver<Event>,
}

/// Started generations of one request; outcomes go to the metering task.
struct Started {
    request_id: String,
    model: String,
    choices: Vec<Choice>,
    done: oneshot::Receiver<Vec<Outcome>>,
}

/// Starts `n` generations for each prompt and spawns the task that meters their outcomes.
fn start(state: &AppState, model: &str, prompts: &[Vec<TokenId>], n: u32, params: &SamplingParams, echo: bool) -> Result<Started, AppError> {
    let request_id = uuid::Uuid::new_v4().simple().to_string();
    let mut choices = Vec::new();
    let mut outcomes = Vec::new();
    let mut failure = None;
    'outer: for prompt in prompts {
        for j in 0..n {
            let mut p = params.clone();
            p.seed = p.seed.map(|s| s.wrapping_add(u64::from(j)));
            let req = GenerateRequest { request_id: request_id.clone(), model: model.to_string(), prompt: prompt.clone(), params: p, echo_logprobs: echo };
            match state.backend.generate(req) {
                Ok(g) => {
                    choices.push(Choice { index: choices.len() as u32, events: g.events });
                    outcomes.push(g.outcome);
                }
                Err(e) => {
                    failure = Some(AppError::from(e));
                    break 'outer;
                }
            }
        }
    }
    let (done_tx, done) = oneshot::channel();
    let (meter, rid, m) = (state.meter.clone(), request_id.clone(), model.to_string());
    state.tasks.spawn(async move {
        let mut all = Vec::with_capacity(outcomes.len());
        for o in outcomes {
            if let Ok(o) = o.await {
                all.push(o);
            }
        }
        meter.record(&rid, &m, &all);
        let _ = done_tx.send(all);
    });
    match failure {
        Some(e) => Err(e),
        None => Ok(Started { request_id, model: model.to_string(), choices, done }),
    }
}

fn total_usage(outcomes: &[Outcome]) -> Usage {
    let mut usage = outcomes.first().map(|o| Usage { completion_tokens: 0, reasoning_tokens: 0, ..o.usage }).unwrap_or_default();
    for o in outcomes {
        usage.add_choice(&o.usage);
    }
    usage
}

fn engine_error(outcomes: &[Outcome]) -> Option<AppError> {
    outcomes
        .iter()
        .find(|o| o.finish_reason == FinishReason::Error)
        .map(|o| AppError::internal(o.error.clone().unwrap_or_else(|| "the engine failed".into())))
}

fn finish_reason(outcomes: &[Outcome], index: u32) -> &'static str {
    outcomes.get(index as usize).map_or("stop", |o| o.finish_reason.as_openai())
}

fn context_length(state: &AppState, model: &str) -> Result<u32, AppError> {
    state
        .backend
        .models()
        .into_iter()
        .find(|m| m.name == model)
        .map(|m| m.context_length)
        .ok_or_else(|| tokenomy_core::BackendError::UnknownModel(model.to_string()).into())
}

fn with_request_id(mut resp: Response, id: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

fn sse<S: Stream<Item = Value> + Send + 'static>(chunks: S) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let body = chunks
        .map(|v| SseEvent::default().data(v.to_string()))
        .chain(stream::once(async { SseEvent::default().data("[DONE]") }))
        .map(Ok);
    Sse::new(body)
}

// ---------------------------------------------------------------------------------------------
// /v1/chat/completions

pub async fn chat_completions(State(state): State<AppState>, ApiJson(req): ApiJson<ChatRequest>) -> Result<Response, AppError> {
    let mut params = openai::sampling(&req.common)?;
    let n = openai::choices(req.common.n)?;
    let top = openai::top_logprobs(req.top_logprobs, "top_logprobs", openai::TOP_LOGPROBS_MAX)?;
    if req.top_logprobs.is_some() && !req.logprobs {
        return Err(AppError::invalid_value("top_logprobs", "top_logprobs requires logprobs: true"));
    }
    params.logprobs = req.logprobs.then_some(top);
    let messages = openai::chat_messages(&req.messages)?;
    let model = req.common.model.clone();
    let ctx = context_length(&state, &model)?;
    let text = state.backend.render_chat(&model, &messages)?;
    let prompt = state.backend.tokenize(&model, &text, true)?;
    let asked = openai::max_tokens(req.max_completion_tokens.or(req.max_tokens), "max_tokens")?;
    params.max_tokens = asked.unwrap_or_else(|| ctx.saturating_sub(prompt.len() as u32));
    if params.max_tokens == 0 && asked.is_none() {
        params.max_tokens = 1; // let the engine report the context overflow with both numbers
    }
    let started = start(&state, &model, &[prompt], n, &params, false)?;
    let include_usage = req.common.stream_options.as_ref().is_some_and(|o| o.include_usage);
    let id = format!("chatcmpl-{}", started.request_id);
    if req.common.stream {
        let rid = started.request_id.clone();
        return Ok(with_request_id(sse(chat_stream(started, id, include_usage)).into_response(), &rid));
    }
    let rid = started.request_id.clone();
    Ok(with_request_id(chat_body(started, id).await?.into_response(), &rid))
}

async fn collect(choice: Choice) -> (u32, String, Vec<LogprobEntry>, Option<Vec<PromptLogprob>>) {
    let mut events = choice.events;
    let (mut text, mut logprobs, mut prompt_lp) = (String::new(), Vec::new(), None);
    while let Some(ev) = events.recv().await {
        match ev {
            Event::Token { text: t, logprob } => {
                text.push_str(&t);
                logprobs.extend(logprob);
            }
            Event::PromptLogprobs(lp) => prompt_lp = Some(lp),
        }
    }
    (choice.index, text, logprobs, prompt_lp)
}

async fn chat_body(started: Started, id: String) -> Result<Json<Value>, AppError> {
    let Started { model, choices, done, .. } = started;
    let collected = futures::future::join_all(choices.into_iter().map(collect)).await;
    let outcomes = done.await.map_err(|_| AppError::internal("the engine dropped the request"))?;
    if let Some(e) = engine_error(&outcomes) {
        return Err(e);
    }
    let choices: Vec<Value> = collected
        .iter()
        .map(|(index, text, lps, _)| {
            let logprobs = (!lps.is_empty()).then(|| json!({"content": lps.iter().map(openai::chat_logprob_json).collect::<Vec<_>>()}));
            json!({
                "index": index,
                "message": {"role": "assistant", "content": text},
                "logprobs": logprobs,
                "finish_reason": finish_reason(&outcomes, *index),
            })
        })
        .collect();
    Ok(Json(json!({
        "id": id, "object": "chat.completion", "created": now_s(), "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": choices,
        "usage": openai::usage_json(&total_usage(&outcomes)),
    })))
}

const SYSTEM_FINGERPRINT: &str = concat!("tokenomy-", env!("CARGO_PKG_VERSION"));

fn merged(choices: Vec<Choice>) -> impl Stream<Item = (u32, Event)> + Send {
    stream::select_all(choices.into_iter().map(|c| {
        let index = c.index;
        UnboundedReceiverStream::new(c.events).map(move |e| (index, e))
    }))
}

fn chat_stream(started: Started, id: String, include_usage: bool) -> impl Stream<Item = Value> + Send {
    let Started { model, choices, done, .. } = started;
    let created = now_s();
    let base = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "system_fingerprint": SYSTEM_FINGERPRINT});
    let chunk = move |choices: Value| {
        let mut c = base.clone();
        c["choices"] = choices;
        c
    };
    let n = choices.len() as u32;
    let head = {
        let chunk = chunk.clone();
        stream::iter((0..n).map(move |i| chunk(json!([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]))))
    };
    let body = {
        let chunk = chunk.clone();
        merged(choices).filter_map(move |(i, ev)| {
            let out = match ev {
                Event::Token { text, logprob } if !text.is_empty() || logprob.is_some() => {
                    let lp = logprob.map(|e| json!({"content": [openai::chat_logprob_json(&e)]}));
                    Some(chunk(json!([{"index": i, "delta": {"content": text}, "logprobs": lp, "finish_reason": null}])))
                }
                _ => None,
            };
            futures::future::ready(out)
        })
    };
    let tail = stream::once(done).flat_map(move |outcomes| {
        let outcomes = outcomes.unwrap_or_default();
        let mut out: Vec<Value> = Vec::new();
        if let Some(e) = engine_error(&outcomes) {
            out.push(e.body());
        }
        for i in 0..n {
            out.push(chunk(json!([{"index": i, "delta": {}, "logprobs": null, "finish_reason": finish_reason(&outcomes, i)}])));
        }
        if include_usage {
            let mut u = chunk(json!([]));
            u["usage"] = openai::usage_json(&total_usage(&outcomes));
            out.push(u);
        }
        stream::iter(out)
    });
    head.chain(body).chain(tail)
}

// ---------------------------------------------------------------------------------------------
// /v1/completions

pub async fn completions(State(state): State<AppState>, ApiJson(req): ApiJson<CompletionRequest>) -> Result<Response, AppError> {
    let mut params = openai::sampling(&req.common)?;
    let n = openai::choices(req.common.n)?;
    let top = openai::top_logprobs(req.logprobs, "logprobs", 5)?;
    params.logprobs = req.logprobs.map(|_| top);
    if req.suffix.is_some() {
        return Err(AppError::invalid_value("suffix", "suffix is not supported"));
    }
    let model = req.common.model.clone();
    context_length(&state, &model)?;
    let prompts = prompt_tokens(&state, &model, &req.prompt)?;
    params.max_tokens = openai::max_tokens(req.max_tokens, "max_tokens")?.unwrap_or(16);
    if params.max_tokens == 0 && !req.echo {
        return Err(AppError::invalid_value("max_tokens", "max_tokens: 0 is only meaningful with echo: true"));
    }
    let echo_logprobs = req.echo && req.logprobs.is_some();
    let started = start(&state, &model, &prompts, n, &params, echo_logprobs)?;
    let echo_texts: Vec<String> = if req.echo {
        prompts.iter().map(|p| state.backend.detokenize(&model, p)).collect::<Result<_, _>>()?
    } else {
        Vec::new()
    };
    let ctx = CompletionCtx { id: format!("cmpl-{}", started.request_id), n, echo_texts, logprobs: req.logprobs.is_some() };
    let rid = started.request_id.clone();
    if req.common.stream {
        let include_usage = req.common.stream_options.as_ref().is_some_and(|o| o.include_usage);
        return Ok(with_request_id(sse(completion_stream(started, ctx, include_usage)).into_response(), &rid));
    }
    Ok(with_request_id(completion_body(started, ctx).await?.into_response(), &rid))
}

struct CompletionCtx {
    id: String,
    n: u32,
    /// Prompt text per prompt when `echo` is on.
    echo_texts: Vec<String>,
    logprobs: bool,
}

fn prompt_tokens(state: &AppState, model: &str, prompt: &PromptField) -> Result<Vec<Vec<TokenId>>, AppError> {
    let tok = |s: &String| state.backend.tokenize(model, s, true).map_err(AppError::from);
    let prompts = match prompt {
        PromptField::Text(s) => vec![tok(s)?],
        PromptField::Texts(v) => v.iter().map(tok).collect::<Result<_, _>>()?,
        PromptField::Tokens(t) => vec![t.clone()],
        PromptField::TokenLists(v) => v.clone(),
    };
    if prompts.is_empty() || prompts.iter().any(Vec::is_empty) {
        return Err(AppError::invalid_value("prompt", "the prompt must not be empty"));
    }
    if prompts.len() > openai::CHOICES_MAX as usize {
        return Err(AppError::invalid_value("prompt", format!("at most {} prompts per request", openai::CHOICES_MAX)));
    }
    Ok(prompts)
}

fn completion_logprobs(echo: Option<&(String, Vec<PromptLogprob>)>, generated: &[LogprobEntry]) -> CompletionLogprobs {
    let mut lp = CompletionLogprobs::default();
    let mut offset = 0;
    if let Some((_, prompt)) = echo {
        for p in prompt {
            lp.push(p.text.clone(), p.entry.as_ref(), offset);
            offset += p.text.chars().count();
        }
    }
    for e in generated {
        lp.push(e.chosen.text.clone(), Some(e), offset);
        offset += e.chosen.text.chars().count();
    }
    lp
}

async fn completion_body(started: Started, ctx: CompletionCtx) -> Result<Json<Value>, AppError> {
    let Started { model, choices, done, .. } = started;
    let collected = futures::future::join_all(choices.into_iter().map(collect)).await;
    let outcomes = done.await.map_err(|_| AppError::internal("the engine dropped the request"))?;
    if let Some(e) = engine_error(&outcomes) {
        return Err(e);
    }
    let choices: Vec<Value> = collected
        .into_iter()
        .map(|(index, text, lps, prompt_lp)| {
            let echo = ctx.echo_texts.get((index / ctx.n) as usize);
            let full = match echo {
                Some(p) => format!("{p}{text}"),
                None => text,
            };
            let echo_lp = match (echo, prompt_lp) {
                (Some(p), Some(lp)) => Some((p.clone(), lp)),
                _ => None,
            };
            let logprobs = ctx.logprobs.then(|| completion_logprobs(echo_lp.as_ref(), &lps));
            json!({"index": index, "text": full, "logprobs": logprobs, "finish_reason": finish_reason(&outcomes, index)})
        })
        .collect();
    Ok(Json(json!({
        "id": ctx.id, "object": "text_completion", "created": now_s(), "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": choices,
        "usage": openai::usage_json(&total_usage(&outcomes)),
    })))
}

fn completion_stream(started: Started, ctx: CompletionCtx, include_usage: bool) -> impl Stream<Item = Value> + Send {
    let Started { model, choices, done, .. } = started;
    let base = json!({"id": ctx.id, "object": "text_completion", "created": now_s(), "model": model, "system_fingerprint": SYSTEM_FINGERPRINT});
    let chunk = move |choices: Value| {
        let mut c = base.clone();
        c["choices"] = choices;
        c
    };
    let total = choices.len() as u32;
    let head = {
        let chunk = chunk.clone();
        let n = ctx.n;
        let texts = ctx.echo_texts.clone();
        stream::iter((0..total).filter_map(move |i| {
            texts.get((i / n) as usize).map(|t| chunk(json!([{"index": i, "text": t, "logprobs": null, "finish_reason": null}])))
        }))
    };
    let body = {
        let chunk = chunk.clone();
        merged(choices).filter_map(move |(i, ev)| {
            let out = match ev {
                Event::Token { text, logprob } if !text.is_empty() || logprob.is_some() => {
                    let lp = logprob.map(|e| completion_logprobs(None, &[e]));
                    Some(chunk(json!([{"index": i, "text": text, "logprobs": lp, "finish_reason": null}])))
                }
                _ => None,
            };
            futures::future::ready(out)
        })
    };
    let tail = stream::once(done).flat_map(move |outcomes| {
        let outcomes = outcomes.unwrap_or_default();
        let mut out: Vec<Value> = Vec::new();
        if let Some(e) = engine_error(&outcomes) {
            out.push(e.body());
        }
        for i in 0..total {
            out.push(chunk(json!([{"index": i, "text": "", "logprobs": null, "finish_reason": finish_reason(&outcomes, i)}])));
        }
        if include_usage {
            let mut u = chunk(json!([]));
            u["usage"] = openai::usage_json(&total_usage(&outcomes));
            out.push(u);
        }
        stream::iter(out)
    });
    head.chain(body).chain(tail)
}

// ---------------------------------------------------------------------------------------------
// models, health, metrics

fn model_json(m: &tokenomy_core::ModelInfo) -> Value {
    json!({
        "id": m.name, "object": "model", "created": 0, "owned_by": "tokenomy",
        "meta": {"architecture": m.architecture, "context_length": m.context_length, "sha256": m.sha256, "chat_template": m.has_chat_template},
    })
}

pub async fn list_models(State(state): State<AppState>) -> Json<Value> {
    let data: Vec<Value> = state.backend.models().iter().map(model_json).collect();
    Json(json!({"object": "list", "data": data}))
}

pub async fn get_model(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>, AppError> {
    let models = state.backend.models();
    let m = models.iter().find(|m| m.name == id).ok_or_else(|| AppError::from(tokenomy_core::BackendError::UnknownModel(id)))?;
    Ok(Json(model_json(m)))
}

pub async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

pub async fn ready(State(state): State<AppState>) -> Response {
    if state.backend.ready() {
        Json(json!({"status": "ready"})).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "loading"}))).into_response()
    }
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    let mut out = state.backend.metrics_text();
    state.meter.render(&mut out);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

pub async fn not_found(req: Request) -> AppError {
    AppError::not_found(format!("Unknown route: {} {}", req.method(), req.uri().path()))
}
