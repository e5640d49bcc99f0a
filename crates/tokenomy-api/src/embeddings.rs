//! `POST /v1/embeddings`: OpenAI's embeddings on the engine's embedding context, charged as
//! prompt tokens at the model's input price, with a receipt like every other charge.
//!
//! The work and its settlement run on a tracked task, as generations' metering does: a client
//! that leaves while its inputs are embedded is still charged for them, and none is charged
//! for vectors it was refused.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};
use tokenomy_core::{FinishReason, Outcome, TokenId, Usage};

use crate::openai::PromptField;
use crate::routes::{self, HashedJson};
use crate::{AppError, AppState};

/// Inputs one request may embed, at most (OpenAI's limit).
pub const EMBED_INPUTS_MAX: usize = 2048;
/// Tokens one embeddings request may hold in all. Each model embeds on one thread, first come
/// first served: without this a single cheap request of 2048 long inputs would hold that
/// thread for hours on a small machine, every other account's embeddings waiting behind it.
pub const EMBED_TOKENS_PER_REQUEST_MAX: usize = 16_384;

#[derive(Debug, Deserialize)]
pub struct EmbeddingRequest {
    model: String,
    input: PromptField,
    encoding_format: Option<String>,
    dimensions: Option<i64>,
    // (`user`, like any other field this node does not act on, is accepted and ignored.)
}

pub async fn embeddings(State(state): State<AppState>, headers: HeaderMap, body: HashedJson<EmbeddingRequest>) -> Result<Response, AppError> {
    let g = match routes::gate(&state, &headers, "/v1/embeddings", body.sha256).await? {
        Ok(g) => g,
        Err(replay) => return Ok(replay),
    };
    routes::run_remembered(&state, g, body, |s, g, b| Box::pin(run(s, g, b))).await
}

/// The inputs as token lists (texts tokenized as the model's tokenizer does, with its BOS).
fn inputs(state: &AppState, model: &str, input: &PromptField) -> Result<Vec<Vec<TokenId>>, AppError> {
    input_count(input)?;
    let tok = |s: &String| state.backend.tokenize(model, s, true).map_err(AppError::from);
    let inputs = match input {
        PromptField::Text(s) => vec![tok(s)?],
        PromptField::Texts(v) => v.iter().map(tok).collect::<Result<_, _>>()?,
        PromptField::Tokens(t) => vec![t.clone()],
        PromptField::TokenLists(v) => v.clone(),
    };
    let tokens: usize = inputs.iter().map(Vec::len).sum();
    if tokens > EMBED_TOKENS_PER_REQUEST_MAX {
        return Err(AppError::invalid_value("input", format!("{tokens} tokens in one request; at most {EMBED_TOKENS_PER_REQUEST_MAX} (send the rest in other requests)")));
    }
    Ok(inputs)
}

/// How many inputs `input` has: at least one, at most [`EMBED_INPUTS_MAX`].
fn input_count(input: &PromptField) -> Result<usize, AppError> {
    match routes::prompt_count(input) {
        0 => Err(AppError::invalid_value("input", "input must not be empty")),
        n if n > EMBED_INPUTS_MAX => Err(AppError::invalid_value("input", format!("at most {EMBED_INPUTS_MAX} inputs per request"))),
        n => Ok(n),
    }
}

/// A vector as OpenAI's `base64` encoding gives it: little-endian float32s.
pub(crate) fn base64_of(v: &[f32]) -> String {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

async fn run(state: &AppState, g: &routes::Gate, body: HashedJson<EmbeddingRequest>) -> Result<Response, AppError> {
    let req = body.value;
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => return Err(AppError::invalid_value("encoding_format", format!("encoding_format must be float or base64, got {other:?}"))),
    };
    let dimensions = match req.dimensions {
        None => None,
        Some(d) => Some(usize::try_from(d).ok().filter(|&d| d > 0).ok_or_else(|| AppError::invalid_value("dimensions", format!("dimensions must be a positive number, got {d}")))?),
    };
    let model = req.model;
    if crate::proxy::upstream_only(state, &model) {
        input_count(&req.input)?;
        return crate::proxy::embeddings(state, g, body.raw, body.sha256).await;
    }
    let inputs = routes::blocking(|| inputs(state, &model, &req.input))?;
    routes::known_tokens(&routes::model_info(state, &model)?, &inputs, "input", &[])?;
    let request_id = uuid::Uuid::new_v4().simple().to_string();
    let charge = routes::begin_charge(state, g, &request_id, &model, routes::prompt_len(&inputs), 0, body.sha256).await?;
    let lengths: Vec<u32> = inputs.iter().map(|i| i.len() as u32).collect();
    let started = match state.backend.embed(&model, inputs).map_err(AppError::from) {
        // The local queue is full: an upstream serving the model takes it.
        Err(e) if crate::proxy::overflows_model(state, &e, &model) => {
            routes::void_charge(state, charge).await;
            return crate::proxy::embeddings(state, g, body.raw, body.sha256).await;
        }
        started => started,
    };
    let (st, m) = (state.clone(), model.clone());
    let task = state.tasks.spawn(async move {
        let vectors = match started {
            Ok(rx) => rx.await.unwrap_or_else(|_| Err(tokenomy_core::BackendError::Internal("the embedding thread dropped the request".into()))).map_err(AppError::from),
            Err(e) => Err(e),
        };
        // A model whose vectors have another length than asked is refused, and not charged.
        let vectors = vectors.and_then(|v| match (dimensions, v.first()) {
            (Some(d), Some(first)) if first.len() != d => {
                Err(AppError::invalid_value("dimensions", format!("`{m}` gives vectors of {} dimensions; it cannot give {d}", first.len())))
            }
            _ => Ok(v),
        });
        let usage = Usage { prompt_tokens: lengths.iter().sum(), ..Usage::default() };
        let outcomes: Vec<Outcome> = match &vectors {
            // The receipt's output hash covers the vectors as `base64` returns them.
            Ok(v) => v.iter().zip(&lengths).map(|(v, &n)| outcome(FinishReason::Stop, n, base64_of(v), None)).collect(),
            Err(e) => vec![outcome(FinishReason::Error, 0, String::new(), Some(e.message.clone()))],
        };
        let (receipt, pending) = match charge {
            Some(c) => routes::finish_charge(&st, c, &m, &outcomes, &usage, vectors.is_err()).await,
            None => (None, None),
        };
        if vectors.is_ok() {
            st.meter.record(&request_id, &m, &outcomes, &usage, receipt.as_ref());
        }
        (request_id, vectors, usage, receipt, pending)
    });
    let (request_id, vectors, usage, receipt, pending) = task.await.map_err(|e| AppError::internal(format!("the embedding task failed: {e}")))?;
    let vectors = vectors?;
    let data: Vec<Value> = vectors
        .iter()
        .enumerate()
        .map(|(i, v)| json!({"object": "embedding", "index": i, "embedding": if base64 { json!(base64_of(v)) } else { json!(v) }}))
        .collect();
    let mut out = json!({"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": usage.prompt_tokens, "total_tokens": usage.prompt_tokens}});
    let receipt_id = routes::receipt_of(receipt.as_ref(), pending.as_ref()).map(|(r, id)| {
        out["receipt"] = r;
        id
    });
    Ok(routes::billed_headers(Json(out).into_response(), &request_id, receipt_id.as_deref(), &g.allowance_now(state).await))
}

fn outcome(finish_reason: FinishReason, prompt_tokens: u32, text: String, error: Option<String>) -> Outcome {
    Outcome { finish_reason, usage: Usage { prompt_tokens, ..Usage::default() }, text, error, stop_sequence: None }
}
