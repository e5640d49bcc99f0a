//! Handlers. Each one: parse and validate → start generations on the backend → spawn the
//! metering task → answer as one JSON body or as an SSE stream.

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::stream::{self, Stream, StreamExt};
use serde_json::{json, Value};
use tokenomy_core::{AnswerEnd, ChatMessage, ChatPrompt, Event, FinishReason, GenerateRequest, LogprobEntry, Outcome, PromptLogprob, SamplingParams, TokenId, Usage};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use tokenomy_chat::callstream::{CallStream, Piece};
use tokenomy_chat::reasoning::{ReasoningSplitter, Split, Start};
use tokenomy_chat::toolcall::{Hermes, ToolCallParser};
use tokenomy_core::ReasoningMode;
use tokenomy_billing::{Allowance, ChargeRequest, Hold, Principal, ReceiptRef, Served};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::openai::{self, ChatRequest, CompletionLogprobs, CompletionRequest, PromptField};
use crate::charge::{self, Begin};
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

/// `Query` whose rejections are OpenAI-shaped errors.
pub struct ApiQuery<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> axum::extract::FromRequestParts<S> for ApiQuery<T> {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, AppError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(ApiQuery(v)),
            Err(r) => Err(query_error(&r.body_text())),
        }
    }
}

/// A query string read as [`ApiQuery`] reads a request's.
pub fn api_query<T: serde::de::DeserializeOwned>(query: &str) -> Result<T, AppError> {
    let uri: axum::http::Uri = format!("/?{query}").parse().map_err(|_| query_error("not a query string"))?;
    axum::extract::Query::<T>::try_from_uri(&uri).map(|q| q.0).map_err(|r| query_error(&r.body_text()))
}

fn query_error(text: &str) -> AppError {
    let param = query_param_named(text).map(str::to_string);
    AppError::invalid(format!("The query string is not valid for this endpoint: {text}"), param.as_deref())
}

/// The parameter a query-string rejection is about, when serde names it: `limit: invalid digit
/// …` or ``unknown field `foo`, expected …``.
fn query_param_named(text: &str) -> Option<&str> {
    let detail = text.rsplit_once("query string: ").map_or(text, |(_, d)| d);
    let name = match detail.strip_prefix("unknown field `") {
        Some(rest) => rest.split('`').next()?,
        None => detail.split_once(": ")?.0,
    };
    (!name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || "_[]".contains(c))).then_some(name)
}

/// A JSON body and the SHA-256 of its bytes (the receipt's `request_sha256`).
pub struct HashedJson<T> {
    pub value: T,
    pub sha256: [u8; 32],
    /// The body as sent (forwarded as is to an upstream).
    pub raw: bytes::Bytes,
}

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequest<S> for HashedJson<T> {
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, AppError> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json") || v.contains("+json"));
        if !is_json {
            return Err(AppError::invalid("Expected a JSON body with `Content-Type: application/json`", None));
        }
        let bytes = bytes::Bytes::from_request(req, state).await.map_err(|r| {
            if stalled(&r) {
                let message = "The request body stalled: no data came within the node's body timeout (--body-read-timeout-ms)";
                return AppError { status: StatusCode::REQUEST_TIMEOUT, code: Some("request_timeout"), ..AppError::invalid(message, None) };
            }
            let status = r.status();
            let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
                format!("The request body is too large: {}", r.body_text())
            } else {
                format!("Could not read the request body: {}", r.body_text())
            };
            AppError { status: if status.is_client_error() { status } else { StatusCode::BAD_REQUEST }, ..AppError::invalid(message, None) }
        })?;
        if bytes.iter().find(|b| !b.is_ascii_whitespace()).is_some_and(|b| *b != b'{') && serde_json::from_slice::<serde::de::IgnoredAny>(&bytes).is_ok() {
            // Every endpoint takes an object: an array is not read as its fields in order.
            return Err(AppError::invalid("The request body must be a JSON object", None));
        }
        let value = Json::<T>::from_bytes(&bytes).map_err(json_rejection)?.0;
        Ok(HashedJson { value, sha256: Sha256::digest(&bytes).into(), raw: bytes })
    }
}

/// Whether a body could not be read because it stalled past the listener's body timeout.
fn stalled(r: &axum::extract::rejection::BytesRejection) -> bool {
    let mut e: Option<&(dyn std::error::Error + 'static)> = Some(r);
    while let Some(err) = e {
        if err.is::<tower_http::timeout::TimeoutError>() {
            return true;
        }
        e = err.source();
    }
    false
}

fn json_rejection(r: JsonRejection) -> AppError {
    let status = r.status();
    let detail = r.body_text();
    let message = match &r {
        JsonRejection::MissingJsonContentType(_) => "Expected a JSON body with `Content-Type: application/json`".to_string(),
        _ if status == StatusCode::PAYLOAD_TOO_LARGE => format!("The request body is too large: {detail}"),
        JsonRejection::JsonDataError(_) => format!("The request body is JSON, but not what this endpoint takes: {detail}"),
        _ => format!("The request body is not valid JSON: {detail}"),
    };
    // A body of the wrong shape is a 400 in OpenAI's API (axum says 422), naming the field.
    let status = match status {
        StatusCode::PAYLOAD_TOO_LARGE | StatusCode::UNSUPPORTED_MEDIA_TYPE => status,
        _ => StatusCode::BAD_REQUEST,
    };
    AppError { status, ..AppError::invalid(message, rejected_param(&detail).as_deref()) }
}

/// The field a JSON body was refused for, from serde's message: `… target type: messages[0].role:
/// unknown variant …` or `… missing field `model` …`.
fn rejected_param(detail: &str) -> Option<String> {
    if let Some((_, rest)) = detail.split_once("target type: ") {
        if let Some((path, _)) = rest.split_once(": ") {
            if !path.is_empty() && !path.contains(' ') {
                return Some(path.to_string());
            }
        }
    }
    let (_, rest) = detail.split_once("missing field `")?;
    rest.split_once('`').map(|(field, _)| field.to_string())
}

pub(crate) fn now_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// One started choice.
struct Choice {
    index: u32,
    events: mpsc::UnboundedReceiver<Event>,
}

/// What the metering task hands to the response: every choice's outcome and, when the
/// request was charged, its receipt.
struct Done {
    outcomes: Vec<Outcome>,
    /// What was processed and billed: each prompt counted once (see [`total_usage`]).
    usage: Usage,
    receipt: Option<ReceiptRef>,
    /// The receipt id of a charge whose settlement the ledger did not take yet (retried in
    /// the background): the answer names it, marked pending.
    receipt_pending: Option<String>,
}

/// Started generations of one request; outcomes go to the metering task.
pub(crate) struct Started {
    pub(crate) request_id: String,
    model: String,
    choices: Vec<Choice>,
    done: oneshot::Receiver<Done>,
}

/// The billing context of one request, decided before generating.
pub(crate) struct Charge {
    pub(crate) principal: Principal,
    pub(crate) hold: Hold,
    pub(crate) request_sha256: [u8; 32],
}

/// Starts `n` generations for each prompt and spawns the task that meters (and, with a
/// charge, settles) their outcomes. The task outlives the client, so a disconnect is charged.
fn start(
    state: &AppState,
    request_id: String,
    model: &str,
    prompts: &[Vec<TokenId>],
    n: u32,
    params: &SamplingParams,
    echo: bool,
    mut charge: Option<Charge>,
    answer_end: &dyn Fn() -> Option<AnswerEnd>,
) -> Result<Started, (AppError, Option<Charge>)> {
    let mut requests = Vec::with_capacity(prompts.len() * n as usize);
    // Each account its own prefix cache: no account learns what another's prompts hold.
    let cache_salt = charge.as_ref().map_or(0, |c| cache_salt_of(c.principal.account));
    for prompt in prompts {
        for j in 0..n {
            let mut p = params.clone();
            p.seed = p.seed.map(|s| s.wrapping_add(u64::from(j)));
            let (request_id, model, prompt, answer_end) = (request_id.clone(), model.to_string(), prompt.clone(), answer_end());
            requests.push(GenerateRequest { request_id, model, prompt, params: p, echo_logprobs: echo, answer_end, cache_salt });
        }
    }
    let (mut choices, mut outcomes) = (Vec::new(), Vec::new());
    // Refused (a full queue, a bad request): nothing ran, and the caller voids the hold, so
    // that the request may go elsewhere (an upstream) with a hold of its own.
    let generations = state.backend.generate(requests).map_err(|e| (AppError::from(e), charge.take()))?;
    for (index, g) in (0u32..).zip(generations) {
        choices.push(Choice { index, events: g.events });
        outcomes.push(g.outcome);
    }
    let (done_tx, done) = oneshot::channel();
    let (st, rid, m, failed) = (state.clone(), request_id.clone(), model.to_string(), false);
    state.tasks.spawn(async move {
        let mut all = Vec::with_capacity(outcomes.len());
        for o in outcomes {
            // A generation whose outcome never came (the engine dropped it) served an unknown
            // amount: it counts as an engine failure, which voids the charge.
            all.push(o.await.unwrap_or_else(|_| Outcome {
                finish_reason: FinishReason::Error,
                usage: Usage::default(),
                text: String::new(),
                error: Some("the engine dropped a generation".into()),
                stop_sequence: None,
            }));
        }
        let usage = total_usage(&all, n);
        let (receipt, receipt_pending) = match charge {
            Some(c) => finish_charge(&st, c, &m, &all, &usage, failed).await,
            None => (None, None),
        };
        st.meter.record(&rid, &m, &all, &usage, receipt.as_ref());
        let _ = done_tx.send(Done { outcomes: all, usage, receipt, receipt_pending });
    });
    Ok(Started { request_id, model: model.to_string(), choices, done })
}

/// An account's prefix-cache namespace (never 0, the namespace of requests without a ledger).
fn cache_salt_of(account: tokenomy_ledger::AccountId) -> u64 {
    (account.0 as u64 ^ (account.0 >> 64) as u64).max(1)
}

/// Runs `f`, a CPU-bound step such as rendering or tokenizing a prompt of up to the body limit
/// (seconds for a few MiB), so that the runtime's other tasks move to another worker meanwhile
/// rather than wait behind it (on a runtime of one thread, as in tests, it just runs).
pub(crate) fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// Voids the hold of a request that did not run.
pub(crate) async fn void_charge(state: &AppState, charge: Option<Charge>) {
    if let (Some(c), Some(billing)) = (charge, &state.billing) {
        if let Err(e) = billing.void(c.hold).await {
            tracing::error!(error = %e, "voiding the hold of a refused request");
        }
    }
}

/// Settles the hold for what was served, or voids it when the engine failed: the receipt, or
/// the id of one whose settlement is being retried.
pub(crate) async fn finish_charge(state: &AppState, c: Charge, model: &str, outcomes: &[Outcome], usage: &Usage, failed: bool) -> (Option<ReceiptRef>, Option<String>) {
    let Some(billing) = state.billing.as_ref() else { return (None, None) };
    let request_id = c.hold.request_id.clone();
    if failed || outcomes.is_empty() || engine_fault(outcomes) {
        if let Err(e) = billing.void(c.hold).await {
            tracing::error!(request_id, error = %e, "voiding a hold");
        }
        return (None, None);
    }
    let texts: Vec<&str> = outcomes.iter().map(|o| o.text.as_str()).collect();
    let served = Served {
        usage: *usage,
        model_sha256: model_sha256(state, model).await,
        request_sha256: c.request_sha256,
        output_sha256: Sha256::digest(serde_json::to_vec(&texts).unwrap_or_default()).into(),
    };
    settle_served(billing, c.hold, served, &request_id).await
}

/// Posts a hold's exact cost: the receipt, or the id of one whose settlement is being retried
/// in the background, or nothing (logged) if the ledger refused it.
pub(crate) async fn settle_served(billing: &tokenomy_billing::Billing, hold: Hold, served: Served, request_id: &str) -> (Option<ReceiptRef>, Option<String>) {
    match billing.settle(hold, served).await {
        Ok(r) => (r, None),
        Err(tokenomy_billing::BillingError::SettlementDeferred { receipt_id, .. }) => (None, Some(receipt_id)),
        Err(e) => {
            tracing::error!(request_id, error = %e, "settling a charge");
            (None, None)
        }
    }
}

/// A response's `receipt`: the one posted, or the id of one still being settled.
pub(crate) fn receipt_of(receipt: Option<&ReceiptRef>, pending: Option<&String>) -> Option<(Value, String)> {
    match (receipt, pending) {
        (Some(r), _) => Some((charge::receipt_json(r), r.receipt_id.clone())),
        (None, Some(id)) => Some((json!({"id": id, "status": "pending", "url": format!("/v1/receipts/{id}")}), id.clone())),
        (None, None) => None,
    }
}

/// The served file's sha256; hashing runs in the background at load, so wait for it (bounded).
async fn model_sha256(state: &AppState, model: &str) -> [u8; 32] {
    for _ in 0..600 {
        let sha = state.backend.models().into_iter().find(|m| m.name == model).and_then(|m| m.sha256);
        if let Some(h) = sha.and_then(|h| hex::decode(h).ok()).and_then(|v| <[u8; 32]>::try_from(v).ok()) {
            return h;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    [0; 32]
}

/// Authenticates, rate-limits and places the hold for the worst case of a request.
pub(crate) async fn begin_charge(
    state: &AppState,
    g: &Gate,
    request_id: &str,
    model: &str,
    prompt_tokens: u64,
    completion_tokens_max: u64,
    request_sha256: [u8; 32],
) -> Result<Option<Charge>, AppError> {
    let (Some(billing), Some(p)) = (&state.billing, g.caller.as_ref()) else { return Ok(None) };
    let req = ChargeRequest {
        request_id: request_id.to_string(),
        model: model.to_string(),
        prompt_tokens,
        completion_tokens_max,
        idempotency_key: g.idempotency_key.clone(),
    };
    // The hold is placed on a task of its own: a client that leaves while it is being placed
    // cancels this handler, not the ledger's write, and the task then voids the hold at once
    // instead of leaving it pending until it times out.
    let (placed_tx, placed) = oneshot::channel();
    let (b, principal) = (billing.clone(), p.clone());
    state.tasks.spawn(async move {
        if let Err(Ok(orphan)) = placed_tx.send(b.hold(&principal, &req).await) {
            if let Err(e) = b.void(orphan).await {
                tracing::error!(error = %e, "voiding the hold of a request whose client left");
            }
        }
    });
    let hold = placed.await.map_err(|_| AppError::internal("placing the hold failed"))?.map_err(|e| {
        // A refusal for the key's limits (a request too large for its TPM) says where they stand.
        let e = AppError::from(e);
        match e.status == axum::http::StatusCode::TOO_MANY_REQUESTS && e.allowance.is_none() {
            true => AppError { allowance: Some(Box::new(g.allowance.clone())), ..e },
            false => e,
        }
    })?;
    Ok(Some(Charge { principal: p.clone(), hold, request_sha256 }))
}

/// The tokens of a request's prompts, together.
pub(crate) fn prompt_len(prompts: &[Vec<TokenId>]) -> u64 {
    prompts.iter().map(|p| p.len() as u64).sum()
}

/// Headers every billed response carries.
pub(crate) fn billed_headers(mut resp: Response, request_id: &str, receipt_id: Option<&str>, allowance: &Allowance) -> Response {
    resp = with_request_id(resp, request_id);
    if let Some(id) = receipt_id.and_then(|id| HeaderValue::from_str(id).ok()) {
        resp.headers_mut().insert("tokenomy-receipt", id);
    }
    charge::ratelimit_headers(&mut resp, allowance);
    resp
}

/// The caller, their rate-limit allowance and the `Idempotency-Key`, or a replayed response.
pub(crate) struct Gate {
    /// What a retry with the same `Idempotency-Key` must match: the route and the body.
    fingerprint: [u8; 32],
    pub(crate) caller: Option<Principal>,
    pub(crate) allowance: Allowance,
    pub(crate) idempotency_key: Option<String>,
    slot: Option<SlotGuard>,
}

impl Gate {
    /// The rate-limit allowance for the response's headers: requests as admitted, tokens as
    /// they stand now, this request's reservation (or, once settled, its use) counted.
    pub(crate) async fn allowance_now(&self, state: &AppState) -> Allowance {
        match (&state.billing, &self.caller) {
            (Some(b), Some(p)) => b.allowance_now(p, self.allowance.clone()).await,
            _ => self.allowance.clone(),
        }
    }
}

/// This run's in-flight `Idempotency-Key` slot. Dropped with the request's task (see
/// [`run_remembered`]: answered, failed, or panicked; or with a stream when it ends), it frees
/// the slot, so that a retry runs or is replayed rather than refused as still in progress.
struct SlotGuard {
    cache: std::sync::Arc<charge::IdempotencyCache>,
    account: tokenomy_ledger::AccountId,
    key: String,
    owner: u64,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.cache.abandon(self.account, &self.key, self.owner);
    }
}

/// Authenticates and admits a request to `route` whose body hashes to `body_sha256`; with an
/// `Idempotency-Key`, a retry of a finished one is replayed instead (only to the same route
/// with the same body: one key's answer is never replayed in another API's shape).
pub(crate) async fn gate(state: &AppState, headers: &HeaderMap, route: &str, body_sha256: [u8; 32]) -> Result<Result<Gate, Response>, AppError> {
    let caller = charge::caller(state, headers).await?;
    let idempotency_key = charge::idempotency_key(headers)?;
    let fingerprint: [u8; 32] = Sha256::new().chain_update(route.as_bytes()).chain_update([0]).chain_update(body_sha256).finalize().into();
    let mut slot = None;
    if let (Some(p), Some(k)) = (&caller, &idempotency_key) {
        match state.idempotency.begin(p.account, k, fingerprint)? {
            Begin::Replay(r) => return Ok(Err(r)),
            Begin::Run(owner) => slot = Some(SlotGuard { cache: state.idempotency.clone(), account: p.account, key: k.clone(), owner }),
        }
    }
    // (A refusal here drops `slot`, which frees the key.)
    let allowance = match (&state.billing, &caller) {
        (Some(b), Some(p)) => b.admit(p).await?,
        _ => Allowance::default(),
    };
    Ok(Ok(Gate { fingerprint, caller, allowance, idempotency_key, slot }))
}

/// What a handler runs between its gate and [`remember`].
pub(crate) type Inner<B> =
    for<'a> fn(&'a AppState, &'a Gate, B) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Response, AppError>> + Send + 'a>>;

/// Runs `inner` and [`remember`]s its answer. With an `Idempotency-Key`, on a task of its own:
/// a client that leaves (a timeout) does not cancel it, so its retry is replayed the answer it
/// was charged for rather than refused as already processed. (A streamed answer is served as
/// it is generated and cannot be replayed: its task ends when the stream starts, and leaving
/// the stream cancels it as without a key.)
pub(crate) async fn run_remembered<B: Send + 'static>(state: &AppState, g: Gate, body: B, inner: Inner<B>) -> Result<Response, AppError> {
    if g.idempotency_key.is_none() || g.caller.is_none() {
        let result = inner(state, &g, body).await;
        return remember(state, g, result).await;
    }
    let st = state.clone();
    let task = state.tasks.spawn(async move {
        let result = inner(&st, &g, body).await;
        remember(&st, g, result).await
    });
    task.await.unwrap_or_else(|e| Err(AppError::internal(format!("the request's task failed: {e}"))))
}

/// Keeps a finished non-streaming answer for retries with the same `Idempotency-Key`. A stream
/// is not replayed: its key stays in flight on this node until the stream ends (a retry
/// meanwhile is refused as in progress), and after that the ledger refuses a second charge.
pub(crate) async fn remember(state: &AppState, mut g: Gate, result: Result<Response, AppError>) -> Result<Response, AppError> {
    let (Some(p), Some(k)) = (&g.caller, &g.idempotency_key) else { return result };
    match result {
        Ok(resp) if resp.status().is_success() && !is_sse(&resp) => {
            let (parts, body) = resp.into_parts();
            let bytes = axum::body::to_bytes(body, usize::MAX).await.map_err(|e| AppError::internal(e.to_string()))?;
            state.idempotency.finish(p.account, k, g.fingerprint, parts.status, bytes.clone(), &parts.headers);
            // (`g.slot`, dropped on return, then finds the slot done and leaves it.)
            Ok(Response::from_parts(parts, axum::body::Body::from(bytes)))
        }
        Ok(resp) if resp.status().is_success() => {
            let slot = g.slot.take();
            let (parts, body) = resp.into_parts();
            let body = body.into_data_stream().map(move |chunk| {
                let _held_until_the_stream_is_dropped = &slot;
                chunk
            });
            Ok(Response::from_parts(parts, axum::body::Body::from_stream(body)))
        }
        // A failure frees the key (`g.slot` dropped on return): a retry runs.
        other => other,
    }
}

fn is_sse(resp: &Response) -> bool {
    resp.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("text/event-stream"))
}

/// The usage of a request's generations, `per_prompt` (its `n`) for each prompt in turn: the
/// choices of one prompt share it, so it counts once; every prompt of a list counts.
fn total_usage(outcomes: &[Outcome], per_prompt: u32) -> Usage {
    let mut usage = Usage::default();
    for choices in outcomes.chunks(per_prompt.max(1) as usize) {
        usage.prompt_tokens += choices[0].usage.prompt_tokens;
        usage.cached_tokens += choices[0].usage.cached_tokens;
        for o in choices {
            usage.add_choice(&o.usage);
        }
    }
    usage
}

/// The engine's errors that end a generation with a constraint's failure start so: the
/// request's own schema or grammar could not be followed (llguidance's limits, reached midway).
const CONSTRAINT_ERROR_PREFIX: &str = "constraint: ";

fn engine_error(outcomes: &[Outcome]) -> Option<AppError> {
    let o = outcomes.iter().find(|o| o.finish_reason == FinishReason::Error)?;
    let error = o.error.clone().unwrap_or_else(|| "the engine failed".into());
    match error.strip_prefix(CONSTRAINT_ERROR_PREFIX) {
        // The request's fault, in a line: the constrained decoder's state dump stays in the log.
        Some(detail) => {
            tracing::warn!(error = %detail, "a constrained generation could not go on");
            let first: String = detail.lines().next().unwrap_or_default().chars().take(300).collect();
            Some(AppError::invalid(format!("The response format or tool schema could not be followed to the end ({first}); simplify it. The tokens generated until then were charged."), None))
        }
        None => Some(AppError::internal(error)),
    }
}

/// Whether a generation failed for the node's own reasons (its hold is voided). A constraint
/// that could not be followed is the request's doing: what it generated until then is charged,
/// as a stream has already sent it (a schema that fails late would otherwise stream for free).
fn engine_fault(outcomes: &[Outcome]) -> bool {
    outcomes.iter().any(|o| o.finish_reason == FinishReason::Error && !o.error.as_deref().is_some_and(|e| e.starts_with(CONSTRAINT_ERROR_PREFIX)))
}

/// The stop string that ended choice `index` (vLLM's `stop_reason`; `null` otherwise).
fn stop_reason(outcomes: &[Outcome], index: u32) -> Option<&str> {
    outcomes.get(index as usize)?.stop_sequence.as_deref()
}

fn finish_reason(outcomes: &[Outcome], index: u32) -> &'static str {
    outcomes.get(index as usize).map_or("stop", |o| o.finish_reason.as_openai())
}

/// What the engine says of `model` (one lookup per request: its context, vocabulary, queue).
pub(crate) fn model_info(state: &AppState, model: &str) -> Result<tokenomy_core::ModelInfo, AppError> {
    state
        .backend
        .models()
        .into_iter()
        .find(|m| m.name == model)
        .ok_or_else(|| tokenomy_core::BackendError::UnknownModel(model.to_string()).into())
}

/// Refuses a request that cannot fit the model's context before anything is held for it: its
/// error must not depend on the balance (a 402 for a request no credit could buy).
/// Whether every prompt and `max_tokens` fit the context; if not, a 400 naming `param`, the
/// request's field for the prompt (`messages` or `prompt`).
fn fits_context(ctx: u32, prompts: &[Vec<TokenId>], max_tokens: u32, param: &str) -> Result<(), AppError> {
    for p in prompts {
        tokenomy_core::BackendError::check_context(ctx, p.len(), max_tokens).map_err(|e| AppError { param: Some(param.into()), ..e.into() })?;
    }
    Ok(())
}

/// Refuses, before anything is held, a request for more generations (prompts × `n`) than the
/// model's queue takes at once: no balance would make it run.
fn fits_queue(info: &tokenomy_core::ModelInfo, wanted: usize) -> Result<(), AppError> {
    let (model, max) = (&info.name, info.generations_max);
    match wanted <= max as usize {
        true => Ok(()),
        false => Err(AppError::invalid_value("n", format!("this request asks for {wanted} generations (prompts × n) and `{model}` queues at most {max} (--queue-max)"))),
    }
}

/// Refuses token ids the model does not have (in the prompts, named by `param`, or in
/// `logit_bias`) before anything is held: such a request leaves no voided hold behind and does
/// not spend an `Idempotency-Key`'s attempts.
pub(crate) fn known_tokens(info: &tokenomy_core::ModelInfo, prompts: &[Vec<TokenId>], param: &str, logit_bias: &[(TokenId, f32)]) -> Result<(), AppError> {
    let (model, vocab) = (&info.name, info.vocab_size);
    let outside = |t: TokenId| u32::try_from(t).map_or(true, |t| t >= vocab);
    if let Some(bad) = prompts.iter().flatten().copied().find(|&t| outside(t)) {
        return Err(AppError::invalid_value(param, format!("token id {bad} is outside the vocabulary of `{model}` (0..{vocab})")));
    }
    if let Some((bad, _)) = logit_bias.iter().copied().find(|&(t, _)| outside(t)) {
        return Err(AppError::invalid_value("logit_bias", format!("logit_bias names token id {bad}, outside the vocabulary of `{model}` (0..{vocab})")));
    }
    Ok(())
}

fn with_request_id(mut resp: Response, id: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

pub(crate) fn sse<S: Stream<Item = Value> + Send + 'static>(chunks: S) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let body = chunks
        .map(|v| SseEvent::default().data(v.to_string()))
        .chain(stream::once(async { SseEvent::default().data("[DONE]") }))
        .map(Ok);
    Sse::new(body)
}

// ---------------------------------------------------------------------------------------------
// /v1/chat/completions

pub async fn chat_completions(State(state): State<AppState>, headers: HeaderMap, body: HashedJson<ChatRequest>) -> Result<Response, AppError> {
    let g = match gate(&state, &headers, "/v1/chat/completions", body.sha256).await? {
        Ok(g) => g,
        Err(replay) => return Ok(replay),
    };
    run_remembered(&state, g, body, |s, g, b| Box::pin(chat_inner(s, g, b))).await
}

async fn chat_inner(state: &AppState, g: &Gate, body: HashedJson<ChatRequest>) -> Result<Response, AppError> {
    if crate::proxy::routes_here(state, &body.value.common.model, body.value.common.n.unwrap_or(1)) {
        return crate::proxy::chat(state, g, body.raw, body.sha256, crate::proxy::Endpoint::Chat).await;
    }
    let (model, raw, sha256) = (body.value.common.model.clone(), body.raw.clone(), body.sha256);
    let run = match chat_run(state, g, body).await {
        // The local queue filled up meanwhile: an upstream serving the model takes it.
        Err(e) if crate::proxy::overflows_model(state, &e, &model) => return crate::proxy::chat(state, g, raw, sha256, crate::proxy::Endpoint::Chat).await,
        r => r?,
    };
    let ChatRun { started, post, id, receipt_id, stream, include_usage, .. } = run;
    let rid = started.request_id.clone();
    if stream {
        let resp = sse(chat_stream(started, id, include_usage, post, None)).into_response();
        return Ok(billed_headers(resp, &rid, receipt_id.as_deref(), &g.allowance_now(state).await));
    }
    let (body, receipt_id) = chat_body(started, id, &post).await?;
    Ok(billed_headers(body.into_response(), &rid, receipt_id.as_deref(), &g.allowance_now(state).await))
}

/// A chat request validated, charged and started; the caller renders its output.
pub(crate) struct ChatRun {
    pub(crate) started: Started,
    pub(crate) post: ChatPost,
    pub(crate) id: String,
    pub(crate) receipt_id: Option<String>,
    pub(crate) stream: bool,
    pub(crate) include_usage: bool,
    /// The rendered prompt's tokens.
    pub(crate) prompt_tokens: u32,
}

pub(crate) async fn chat_run(state: &AppState, g: &Gate, body: HashedJson<ChatRequest>) -> Result<ChatRun, AppError> {
    let req = body.value;
    req.unserved()?;
    let mut params = openai::sampling(&req.common)?;
    let n = openai::choices(req.common.n)?;
    let top = openai::top_logprobs(req.top_logprobs, "top_logprobs", openai::TOP_LOGPROBS_MAX)?;
    if req.top_logprobs.is_some() && !req.logprobs {
        return Err(AppError::invalid_value("top_logprobs", "top_logprobs requires logprobs: true"));
    }
    params.logprobs = req.logprobs.then_some(top);
    let messages = openai::chat_messages(&req.messages)?;
    let model = req.common.model.clone();
    let info = model_info(state, &model)?;
    let ctx = info.context_length;
    for (legacy, now) in [("functions", &req.functions), ("function_call", &req.function_call)] {
        if now.as_ref().is_some_and(|v| !v.is_null()) {
            let msg = format!("`{legacy}` is OpenAI's deprecated function calling; send the functions as `tools` (and `function_call` as `tool_choice`)");
            return Err(AppError::invalid_value(legacy, msg));
        }
    }
    let tools = openai::tools(req.tools.as_ref(), req.tool_choice.as_ref())?;
    let active = tools.filter(|t| t.choice != openai::ToolChoice::None);
    let defs: &[Value] = active.as_ref().map_or(&[], |t| &t.defs);
    let ChatPrompt { text, tokens: prompt } = blocking(|| state.backend.render_chat(&model, &messages, defs))?;
    let format = reasoning_format(req.reasoning_format.as_deref())?;
    let prefill = messages.last().is_some_and(ChatMessage::is_prefill);
    // The answer starts inside a think block when the prompt left one open: the template's
    // (it ends with `<think>`) or an assistant prefill's (its last `<think>` is not closed).
    let opened = match prefill {
        false => text.trim_end().ends_with(tokenomy_chat::reasoning::OPEN),
        true => text.rfind(tokenomy_chat::reasoning::OPEN) > text.rfind(tokenomy_chat::reasoning::CLOSE),
    };
    params.reasoning = match (format, opened) {
        (ReasoningFormat::None, _) => ReasoningMode::Off,
        (_, true) => ReasoningMode::OpenedByPrompt,
        (_, false) => ReasoningMode::Detect,
    };
    params.reasoning_budget = match req.thinking_token_budget {
        None => None,
        Some(b) => Some(u32::try_from(b).map_err(|_| {
            AppError::invalid_value("thinking_token_budget", format!("thinking_token_budget must be a whole number of tokens from 0 to {}, got {b}", u32::MAX))
        })?),
    };
    params.grammar = openai::response_format(req.response_format.as_ref())?;
    // `required` or a named function: decoding is constrained to a valid call. `auto` with a
    // JSON response format: to a valid call or the formatted answer (agent frameworks ask for
    // both: tools while working, a typed final answer).
    let forced: Option<Vec<&Value>> = active.as_ref().and_then(|t| match &t.choice {
        openai::ToolChoice::Required => Some(t.defs.iter().collect()),
        openai::ToolChoice::Named(n) => Some(t.defs.iter().filter(|d| d["function"]["name"] == n.as_str()).collect()),
        _ => None,
    });
    let answer = match (&params.grammar, &active) {
        (Some(tokenomy_core::Grammar::JsonSchema(schema)), Some(t)) if t.choice == openai::ToolChoice::Auto => Some(schema.clone()),
        _ => None,
    };
    // `auto` with strict tools: the answer is free, and a call, from its opening on (the tag, or
    // the fence or bare object small models write, once it names a tool), matches its tool's
    // schema (llama.cpp's lazy grammars; see `Hermes::call_openings`).
    let strict_auto = match (&active, &answer) {
        (Some(t), None) if t.choice == openai::ToolChoice::Auto && t.defs.iter().any(|d| d["function"]["strict"] == true) => {
            Some(t.defs.iter().collect::<Vec<_>>())
        }
        _ => None,
    };
    let lazy = strict_auto.is_some();
    let constrained = forced.or_else(|| answer.as_ref().and(active.as_ref()).map(|t| t.defs.iter().collect())).or(strict_auto);
    // Where a schema llguidance refuses came from, for the error's `param`.
    let grammar_param = if constrained.is_some() { "tools" } else { "response_format.json_schema.schema" };
    if let Some(defs) = constrained {
        // A call's arguments get exactly the declared parameters (OpenAI's strict mode); under
        // `auto`, only a strict tool's are closed, the others' match their schema as written.
        let closed: Vec<(&str, Value)> = defs
            .iter()
            .map(|d| {
                let mut p = match &d["function"]["parameters"] {
                    // No parameters (or `{}`): a function of no arguments, as OpenAI reads it.
                    Value::Null => json!({"type": "object", "properties": {}}),
                    Value::Object(o) if o.is_empty() => json!({"type": "object", "properties": {}}),
                    p => p.clone(),
                };
                if !lazy || d["function"]["strict"] == true {
                    openai::closed_objects(&mut p);
                }
                (d["function"]["name"].as_str().unwrap_or_default(), tokenomy_core::with_bounded_whitespace(p))
            })
            .collect();
        let tools: Vec<(&str, &Value)> = closed.iter().map(|(n, p)| (*n, p)).collect();
        let one_token = |tag: &str| state.backend.tokenize(&model, tag, false).ok().filter(|t| t.len() == 1).map(|t| t[0]);
        let tag_tokens = one_token("<tool_call>").zip(one_token("</tool_call>"));
        params.grammar = Some(tokenomy_core::Grammar::Lark(match answer {
            None if lazy => Hermes.lazy_call_grammar(&tools, tag_tokens),
            None => Hermes.call_grammar(&tools, tag_tokens),
            Some(schema) => Hermes.call_or_answer_grammar(&tools, tag_tokens, &tokenomy_core::with_bounded_whitespace(schema)),
        }));
        if lazy {
            use tokenomy_core::GrammarTrigger;
            let names: Vec<&str> = tools.iter().map(|(n, _)| *n).collect();
            let (anywhere, at_start) = Hermes.call_openings(tag_tokens, &names);
            let texts = anywhere.into_iter().map(GrammarTrigger::Text).chain(at_start.into_iter().map(GrammarTrigger::TextAtStart));
            params.grammar_triggers = tag_tokens.map(|(open, _)| GrammarTrigger::Token(open)).into_iter().chain(texts).collect();
        }
    }
    if params.grammar.is_some() && !lazy {
        if prefill {
            // The grammar constrains the answer from its first character, which a prefill
            // has already begun (Anthropic refuses the pair too).
            return Err(AppError::invalid(
                "A final assistant message (a prefill) cannot be combined with response_format or a required tool call: the constrained answer would restart after it",
                Some("messages"),
            ));
        }
        params.reasoning = ReasoningMode::Off;
    }
    let post = ChatPost {
        tool_names: active.map(|t| t.names).unwrap_or_default(),
        one_call: req.parallel_tool_calls == Some(false),
        reasoning: match params.reasoning {
            ReasoningMode::Off => None,
            ReasoningMode::OpenedByPrompt => Some(Start::InReasoning),
            ReasoningMode::Detect => Some(Start::Detect),
        },
        format,
    };
    let param = if req.max_completion_tokens.is_some() { "max_completion_tokens" } else { "max_tokens" };
    let asked = openai::max_tokens(req.max_completion_tokens.or(req.max_tokens), param, 1)?;
    params.max_tokens = asked.unwrap_or_else(|| ctx.saturating_sub(prompt.len() as u32));
    if let (None, Some(tpm)) = (asked, g.caller.as_ref().and_then(|p| p.limits.tpm)) {
        // Without max_tokens, an answer on a key with a TPM limit may use what the limit
        // leaves after its prompt: it ends there with finish_reason "length" instead of
        // putting the key in debt for hours (a prompt over the limit is refused when held).
        let left = tpm.saturating_sub(prompt.len() as u32) / n;
        if left > 0 {
            params.max_tokens = params.max_tokens.min(left);
        }
    }
    if params.max_tokens == 0 && asked.is_none() {
        params.max_tokens = 1; // let the engine report the context overflow with both numbers
    }
    let request_id = uuid::Uuid::new_v4().simple().to_string();
    let prompt_tokens = prompt.len() as u32;
    let prompts = [prompt];
    fits_context(ctx, &prompts, params.max_tokens, "messages")?;
    known_tokens(&info, &prompts, "messages", &params.logit_bias)?;
    fits_queue(&info, n as usize)?;
    let worst = u64::from(n) * u64::from(params.max_tokens);
    let charge = begin_charge(state, g, &request_id, &model, prompt_len(&prompts), worst, body.sha256).await?;
    let receipt_id = charge.as_ref().filter(|c| c.hold.is_charged()).map(|c| c.hold.receipt_id.clone());
    let started = match start(state, request_id, &model, &prompts, n, &params, false, charge, &|| post.answer_end()) {
        Ok(s) => s,
        Err((e, charge)) => {
            void_charge(state, charge).await;
            if e.param.is_none() && e.message.starts_with(tokenomy_core::INVALID_GRAMMAR_PREFIX) {
                return Err(AppError { param: Some(grammar_param.into()), code: Some("invalid_value"), ..e });
            }
            return Err(e);
        }
    };
    let include_usage = req.common.stream_options.as_ref().is_some_and(|o| o.include_usage);
    let id = format!("chatcmpl-{}", started.request_id);
    Ok(ChatRun { started, post, id, receipt_id, stream: req.common.stream, include_usage, prompt_tokens })
}

async fn collect(choice: Choice) -> (u32, String, Vec<LogprobEntry>, Option<Vec<PromptLogprob>>) {
    let c = collect_until_settled(choice, None).await;
    (c.index, c.text, c.logprobs, c.prompt_logprobs)
}

/// One choice's output, collected.
struct Collected {
    index: u32,
    text: String,
    logprobs: Vec<LogprobEntry>,
    prompt_logprobs: Option<Vec<PromptLogprob>>,
    /// With tools on, when `max_tokens` cut the answer's last call short: the deltas a stream
    /// of this answer sent, the partial call included (the answer is then what they add up to).
    cut: Option<Vec<Value>>,
}

/// Collects a choice; with tools on, stops the engine once the answer's calls are settled
/// (closing the events channel cancels the job; what was generated is still metered).
async fn collect_until_settled(choice: Choice, post: Option<&ChatPost>) -> Collected {
    let mut events = choice.events;
    let mut reader = post.filter(|p| p.tools_on()).map(|p| (p, ChoiceReader::new(p)));
    let (mut text, mut logprobs, mut prompt_lp, mut deltas) = (String::new(), Vec::new(), None, Vec::new());
    let mut settled = false;
    while let Some(ev) = events.recv().await {
        match ev {
            // Tokens the engine made before it saw the stop are metered, not part of the answer.
            Event::Token { .. } if settled => {}
            Event::Token { text: t, logprob } => {
                text.push_str(&t);
                if let Some((p, r)) = reader.as_mut() {
                    deltas.extend(r.push(p, &t));
                    if r.settled() {
                        events.close();
                        settled = true;
                    }
                }
                logprobs.extend(logprob);
            }
            Event::PromptLogprobs(lp) => prompt_lp = Some(lp),
            Event::Admitted { .. } => {}
        }
    }
    let cut = reader.and_then(|(p, mut r)| {
        deltas.extend(r.finish(p));
        r.cut().then_some(deltas)
    });
    Collected { index: choice.index, text, logprobs, prompt_logprobs: prompt_lp, cut }
}

/// The message that a stream's deltas add up to: its content, reasoning and calls, each call
/// with the arguments as far as they were written.
fn message_of_deltas(deltas: &[Value]) -> Value {
    let mut m = json!({"role": "assistant", "content": null});
    let mut calls: Vec<Value> = Vec::new();
    for d in deltas {
        for key in ["content", "reasoning_content", "reasoning"] {
            if let Some(t) = d[key].as_str() {
                m[key] = json!(format!("{}{t}", m[key].as_str().unwrap_or_default()));
            }
        }
        for tc in d["tool_calls"].as_array().into_iter().flatten() {
            let i = tc["index"].as_u64().unwrap_or_default() as usize;
            if calls.len() <= i {
                calls.resize(i + 1, json!({"id": null, "type": "function", "function": {"name": null, "arguments": ""}}));
            }
            let call = &mut calls[i];
            for key in ["id", "type"] {
                if !tc[key].is_null() {
                    call[key] = tc[key].clone();
                }
            }
            if !tc["function"]["name"].is_null() {
                call["function"]["name"] = tc["function"]["name"].clone();
            }
            if let Some(a) = tc["function"]["arguments"].as_str() {
                call["function"]["arguments"] = json!(format!("{}{a}", call["function"]["arguments"].as_str().unwrap_or_default()));
            }
        }
    }
    if !calls.is_empty() {
        m["tool_calls"] = json!(calls);
    }
    m
}

/// Where reasoning text goes in the response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReasoningFormat {
    ReasoningContent,
    Reasoning,
    Both,
    None,
}

fn reasoning_format(v: Option<&str>) -> Result<ReasoningFormat, AppError> {
    match v {
        None | Some("reasoning_content") | Some("deepseek") | Some("auto") => Ok(ReasoningFormat::ReasoningContent),
        Some("reasoning") => Ok(ReasoningFormat::Reasoning),
        Some("both") => Ok(ReasoningFormat::Both),
        Some("none") => Ok(ReasoningFormat::None),
        Some(other) => Err(AppError::invalid_value(
            "reasoning_format",
            format!("reasoning_format must be \"reasoning_content\", \"reasoning\", \"both\" or \"none\", got {other:?}"),
        )),
    }
}

/// How a chat answer is read back: tool calls and the reasoning split.
#[derive(Clone)]
pub(crate) struct ChatPost {
    tool_names: Vec<String>,
    /// `parallel_tool_calls: false`: at most one call, and the answer ends with it.
    one_call: bool,
    reasoning: Option<Start>,
    format: ReasoningFormat,
}

/// One choice's text as an assistant message, and whether it is a tool call.
struct Answer {
    reasoning: String,
    content: String,
    calls: Vec<tokenomy_chat::toolcall::ToolCall>,
}

impl ChatPost {
    fn tools_on(&self) -> bool {
        !self.tool_names.is_empty()
    }

    /// With tools on, the engine's check that a choice's answer is settled (its calls read, see
    /// [`ChoiceReader::settled`]): the answer ends on the token that settles it, in the engine.
    fn answer_end(&self) -> Option<AnswerEnd> {
        if !self.tools_on() {
            return None;
        }
        let post = self.clone();
        let mut reader = ChoiceReader::new(&post);
        Some(AnswerEnd(Box::new(move |text| {
            reader.push(&post, text);
            reader.settled()
        })))
    }

    fn read(&self, text: &str) -> Answer {
        let (reasoning, content) = match self.reasoning {
            Some(start) => {
                let s = tokenomy_chat::reasoning::split(text, start);
                (s.reasoning, s.content)
            }
            None => (String::new(), text.to_string()),
        };
        if self.tools_on() {
            let names: Vec<&str> = self.tool_names.iter().map(String::as_str).collect();
            let mut p = Hermes.parse(&content, &names);
            if self.one_call {
                if p.calls.is_empty() {
                    // The engine ended the answer when the call's arguments closed.
                    if let Some((before, call)) = tokenomy_chat::callstream::first_call(&content, &names) {
                        return Answer { reasoning, content: before, calls: vec![call] };
                    }
                }
                p.calls.truncate(1);
            }
            if !p.calls.is_empty() {
                return Answer { reasoning, content: p.content, calls: p.calls };
            }
        }
        Answer { reasoning, content, calls: Vec::new() }
    }

    fn put_reasoning(&self, target: &mut Value, reasoning: &str) {
        if reasoning.is_empty() {
            return;
        }
        if matches!(self.format, ReasoningFormat::ReasoningContent | ReasoningFormat::Both) {
            target["reasoning_content"] = json!(reasoning);
        }
        if matches!(self.format, ReasoningFormat::Reasoning | ReasoningFormat::Both) {
            target["reasoning"] = json!(reasoning);
        }
    }
}

fn call_id() -> String {
    format!("call_{}", &uuid::Uuid::new_v4().simple().to_string()[..24])
}

fn message_json(post: &ChatPost, a: &Answer) -> Value {
    let content = if a.calls.is_empty() || !a.content.is_empty() { json!(a.content) } else { Value::Null };
    let mut m = json!({"role": "assistant", "content": content});
    post.put_reasoning(&mut m, &a.reasoning);
    if !a.calls.is_empty() {
        m["tool_calls"] = a
            .calls
            .iter()
            .map(|c| json!({"id": call_id(), "type": "function", "function": {"name": c.name, "arguments": c.arguments.to_string()}}))
            .collect();
    }
    m
}

fn answer_finish_reason(outcomes: &[Outcome], index: u32, a: &Answer) -> &'static str {
    if a.calls.is_empty() {
        finish_reason(outcomes, index)
    } else {
        "tool_calls"
    }
}

/// The answer and the id of its receipt (posted or pending).
pub(crate) async fn chat_body(started: Started, id: String, post: &ChatPost) -> Result<(Json<Value>, Option<String>), AppError> {
    let Started { model, choices, done, .. } = started;
    let collected = futures::future::join_all(choices.into_iter().map(|c| collect_until_settled(c, Some(post)))).await;
    let Done { outcomes, usage, receipt, receipt_pending } = done.await.map_err(|_| AppError::internal("the engine dropped the request"))?;
    if let Some(e) = engine_error(&outcomes) {
        return Err(e);
    }
    let choices: Vec<Value> = collected
        .iter()
        .map(|c| {
            let logprobs = (!c.logprobs.is_empty()).then(|| json!({"content": c.logprobs.iter().map(openai::chat_logprob_json).collect::<Vec<_>>()}));
            // A call that `max_tokens` cut short: what the stream sent, with `length`, as
            // OpenAI answers it (an agent must not run a call whose arguments were cut).
            let (message, finish_reason) = match &c.cut {
                Some(deltas) => (message_of_deltas(deltas), "length"),
                None => {
                    let a = post.read(&c.text);
                    (message_json(post, &a), answer_finish_reason(&outcomes, c.index, &a))
                }
            };
            json!({
                "index": c.index,
                "message": message,
                "logprobs": logprobs,
                "finish_reason": finish_reason,
                "stop_reason": stop_reason(&outcomes, c.index),
            })
        })
        .collect();
    let mut body = json!({
        "id": id, "object": "chat.completion", "created": now_s(), "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": choices,
        "usage": openai::usage_json(&usage),
    });
    let receipt = receipt_of(receipt.as_ref(), receipt_pending.as_ref()).map(|(json, id)| {
        body["receipt"] = json;
        id
    });
    Ok((Json(body), receipt))
}

const SYSTEM_FINGERPRINT: &str = concat!("tokenomy-", env!("CARGO_PKG_VERSION"));

fn merged(choices: Vec<Choice>) -> impl Stream<Item = (u32, Event)> + Send {
    stream::select_all(choices.into_iter().map(|c| {
        let index = c.index;
        UnboundedReceiverStream::new(c.events).map(move |e| (index, e))
    }))
}

/// Like [`merged`], but choice `i`'s engine job is stopped (its channel closed, what is
/// buffered still delivered) once `stops[i]` is set.
fn merged_stoppable(choices: Vec<Choice>, stops: Arc<Vec<AtomicBool>>) -> impl Stream<Item = (u32, Event)> + Send {
    stream::select_all(choices.into_iter().map(move |c| {
        let (index, stops) = (c.index, stops.clone());
        stream::unfold((c.events, false), move |(mut rx, closed)| {
            let stops = stops.clone();
            async move {
                let stop = !closed && stops.get(index as usize).is_some_and(|s| s.load(AtomicOrdering::Relaxed));
                if stop {
                    rx.close();
                }
                rx.recv().await.map(|e| ((index, e), (rx, closed || stop)))
            }
        })
        .boxed()
    }))
}

/// What one streamed choice has read so far: the reasoning split, then tool calls.
struct ChoiceReader {
    splitter: Option<ReasoningSplitter>,
    calls: Option<CallStream>,
}

impl ChoiceReader {
    fn new(post: &ChatPost) -> Self {
        let names: Vec<&str> = post.tool_names.iter().map(String::as_str).collect();
        let calls = post.tools_on().then(|| CallStream::new(&names)).map(|c| if post.one_call { c.one_call() } else { c });
        ChoiceReader { splitter: post.reasoning.map(ReasoningSplitter::new), calls }
    }

    /// Deltas for the next piece of text (several when, say, content is followed by a call).
    fn push(&mut self, post: &ChatPost, text: &str) -> Vec<Value> {
        let split = match &mut self.splitter {
            Some(sp) => sp.push(text),
            None => Split { reasoning: String::new(), content: text.to_string() },
        };
        self.deltas(post, split, false)
    }

    fn finish(&mut self, post: &ChatPost) -> Vec<Value> {
        let split = self.splitter.as_mut().map(ReasoningSplitter::finish).unwrap_or_default();
        self.deltas(post, split, true)
    }

    fn settled(&self) -> bool {
        self.calls.as_ref().is_some_and(CallStream::settled)
    }

    fn called(&self) -> bool {
        self.calls.as_ref().is_some_and(|c| c.calls() > 0)
    }

    /// After `finish`: the last call streamed was cut short.
    fn cut(&self) -> bool {
        self.calls.as_ref().is_some_and(CallStream::cut)
    }

    fn deltas(&mut self, post: &ChatPost, split: Split, last: bool) -> Vec<Value> {
        let mut out = Vec::new();
        let mut r = json!({});
        post.put_reasoning(&mut r, &split.reasoning);
        if r.as_object().is_some_and(|o| !o.is_empty()) {
            out.push(r);
        }
        let Some(calls) = &mut self.calls else {
            if !split.content.is_empty() {
                out.push(json!({"content": split.content}));
            }
            return out;
        };
        let mut pieces = calls.push(&split.content);
        if last {
            pieces.extend(calls.finish());
        }
        out.extend(pieces.into_iter().map(piece_delta));
        out
    }
}

/// One piece of an answer as OpenAI streams it: a call's id and name first, then its arguments.
fn piece_delta(p: Piece) -> Value {
    match p {
        Piece::Content(s) => json!({"content": s}),
        Piece::CallStart { index, name } => {
            json!({"tool_calls": [{"index": index, "id": call_id(), "type": "function", "function": {"name": name, "arguments": ""}}]})
        }
        Piece::CallArgs { index, fragment } => json!({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]}),
    }
}

/// The OpenAI chunks of a streamed chat answer. `cached`, when given, is set to the prompt
/// tokens the prefix cache held as soon as the engine admits the first choice (before any
/// token), for an API that reports them at the start of its stream (Anthropic's).
pub(crate) fn chat_stream(started: Started, id: String, include_usage: bool, post: ChatPost, cached: Option<Arc<std::sync::OnceLock<u32>>>) -> impl Stream<Item = Value> + Send {
    let post = Arc::new(post);
    let readers: Arc<Mutex<HashMap<u32, ChoiceReader>>> = Arc::default();
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
    let stops: Arc<Vec<AtomicBool>> = Arc::new((0..n).map(|_| AtomicBool::new(false)).collect());
    let body = {
        let (chunk, post, readers, stopper) = (chunk.clone(), post.clone(), readers.clone(), stops.clone());
        merged_stoppable(choices, stops).flat_map(move |(i, ev)| {
            let mut out = Vec::new();
            if let (Event::Admitted { cached_tokens }, Some(cell)) = (&ev, &cached) {
                let _ = cell.set(*cached_tokens);
            }
            if let Event::Token { text, logprob } = ev {
                let mut lp = logprob.map(|e| json!({"content": [openai::chat_logprob_json(&e)]}));
                let mut readers = readers.lock().expect("readers");
                let reader = readers.entry(i).or_insert_with(|| ChoiceReader::new(&post));
                let deltas = reader.push(&post, &text);
                if reader.settled() {
                    stopper[i as usize].store(true, AtomicOrdering::Relaxed);
                }
                for d in deltas {
                    out.push(chunk(json!([{"index": i, "delta": d, "logprobs": lp.take(), "finish_reason": null}])));
                }
                if let Some(lp) = lp {
                    out.push(chunk(json!([{"index": i, "delta": {}, "logprobs": lp, "finish_reason": null}])));
                }
            }
            stream::iter(out)
        })
    };
    let tail = stream::once(done).flat_map(move |done| {
        let (outcomes, usage, receipt, pending) = done.map(|d| (d.outcomes, d.usage, d.receipt, d.receipt_pending)).unwrap_or_default();
        let mut out: Vec<Value> = Vec::new();
        if let Some(e) = engine_error(&outcomes) {
            out.push(e.body());
        }
        for i in 0..n {
            let mut reader = readers.lock().expect("readers").remove(&i).unwrap_or_else(|| ChoiceReader::new(&post));
            for d in reader.finish(&post) {
                out.push(chunk(json!([{"index": i, "delta": d, "logprobs": null, "finish_reason": null}])));
            }
            // A call that `max_tokens` cut short was streamed in part: `length`, as OpenAI
            // says, so that an agent does not run it.
            let reason = match (reader.cut(), reader.called()) {
                (true, _) => "length",
                (false, true) => "tool_calls",
                (false, false) => finish_reason(&outcomes, i),
            };
            out.push(chunk(json!([{"index": i, "delta": {}, "logprobs": null, "finish_reason": reason, "stop_reason": stop_reason(&outcomes, i)}])));
        }
        if include_usage {
            let mut u = chunk(json!([]));
            u["usage"] = openai::usage_json(&usage);
            out.push(u);
        }
        if let (Some((r, _)), Some(last)) = (receipt_of(receipt.as_ref(), pending.as_ref()), out.last_mut()) {
            last["receipt"] = r;
        }
        stream::iter(out)
    });
    head.chain(body).chain(tail)
}

// ---------------------------------------------------------------------------------------------
// /v1/completions

/// A text completion's `max_tokens` when the client names none: the API's own default.
pub(crate) const TEXT_COMPLETION_TOKENS_DEFAULT: u64 = 16;

pub async fn completions(State(state): State<AppState>, headers: HeaderMap, body: HashedJson<CompletionRequest>) -> Result<Response, AppError> {
    let g = match gate(&state, &headers, "/v1/completions", body.sha256).await? {
        Ok(g) => g,
        Err(replay) => return Ok(replay),
    };
    run_remembered(&state, g, body, |s, g, b| Box::pin(completions_inner(s, g, b))).await
}

async fn completions_inner(state: &AppState, g: &Gate, body: HashedJson<CompletionRequest>) -> Result<Response, AppError> {
    let req = body.value;
    let mut params = openai::sampling(&req.common)?;
    let n = openai::choices(req.common.n)?;
    let top = openai::top_logprobs(req.logprobs, "logprobs", 5)?;
    params.logprobs = req.logprobs.map(|_| top);
    if req.suffix.is_some() {
        return Err(AppError::invalid_value("suffix", "suffix is not supported"));
    }
    match req.best_of {
        Some(b) if b < i64::from(n) => return Err(AppError::invalid_value("best_of", format!("best_of must be at least n ({n}), got {b}"))),
        Some(b) if b > i64::from(n) => {
            return Err(AppError::invalid_value("best_of", "best_of greater than n is not supported: ask for n choices and pick one"));
        }
        _ => {}
    }
    let model = req.common.model.clone();
    let generations = prompt_count(&req.prompt).saturating_mul(n as usize).min(u32::MAX as usize) as u32;
    if crate::proxy::routes_here(state, &model, generations) {
        return crate::proxy::chat(state, g, body.raw, body.sha256, crate::proxy::Endpoint::Completion).await;
    }
    let info = model_info(state, &model)?;
    let ctx = info.context_length;
    let prompts = blocking(|| prompt_tokens(state, &model, &req.prompt))?;
    params.max_tokens = openai::max_tokens(req.max_tokens, "max_tokens", 0)?.unwrap_or(TEXT_COMPLETION_TOKENS_DEFAULT as u32);
    if params.max_tokens == 0 && !req.echo {
        return Err(AppError::invalid_value("max_tokens", "max_tokens: 0 is only meaningful with echo: true"));
    }
    fits_context(ctx, &prompts, params.max_tokens, "prompt")?;
    known_tokens(&info, &prompts, "prompt", &params.logit_bias)?;
    fits_queue(&info, prompts.len() * n as usize)?;
    let echo_logprobs = req.echo && req.logprobs.is_some();
    let request_id = uuid::Uuid::new_v4().simple().to_string();
    let worst = prompts.len() as u64 * u64::from(n) * u64::from(params.max_tokens);
    let charge = begin_charge(state, g, &request_id, &model, prompt_len(&prompts), worst, body.sha256).await?;
    let receipt_id = charge.as_ref().filter(|c| c.hold.is_charged()).map(|c| c.hold.receipt_id.clone());
    let started = match start(state, request_id, &model, &prompts, n, &params, echo_logprobs, charge, &|| None) {
        Ok(s) => s,
        Err((e, charge)) => {
            void_charge(state, charge).await;
            // The local queue filled up meanwhile: an upstream serving the model takes it.
            if crate::proxy::overflows_model(state, &e, &model) {
                return crate::proxy::chat(state, g, body.raw, body.sha256, crate::proxy::Endpoint::Completion).await;
            }
            return Err(e);
        }
    };
    let echo_texts: Vec<String> = if req.echo {
        prompts.iter().map(|p| state.backend.detokenize(&model, p)).collect::<Result<_, _>>()?
    } else {
        Vec::new()
    };
    let ctx = CompletionCtx { id: format!("cmpl-{}", started.request_id), n, echo_texts, logprobs: req.logprobs.is_some() };
    let rid = started.request_id.clone();
    if req.common.stream {
        let include_usage = req.common.stream_options.as_ref().is_some_and(|o| o.include_usage);
        let resp = sse(completion_stream(started, ctx, include_usage)).into_response();
        return Ok(billed_headers(resp, &rid, receipt_id.as_deref(), &g.allowance_now(state).await));
    }
    let (body, receipt_id) = completion_body(started, ctx).await?;
    Ok(billed_headers(body.into_response(), &rid, receipt_id.as_deref(), &g.allowance_now(state).await))
}

struct CompletionCtx {
    id: String,
    n: u32,
    /// Prompt text per prompt when `echo` is on.
    echo_texts: Vec<String>,
    logprobs: bool,
}

/// How many prompts `prompt` holds (one generation each per choice).
pub(crate) fn prompt_count(prompt: &PromptField) -> usize {
    match prompt {
        PromptField::Text(_) | PromptField::Tokens(_) => 1,
        PromptField::Texts(v) => v.len(),
        PromptField::TokenLists(v) => v.len(),
    }
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

async fn completion_body(started: Started, ctx: CompletionCtx) -> Result<(Json<Value>, Option<String>), AppError> {
    let Started { model, choices, done, .. } = started;
    let collected = futures::future::join_all(choices.into_iter().map(collect)).await;
    let Done { outcomes, usage, receipt, receipt_pending } = done.await.map_err(|_| AppError::internal("the engine dropped the request"))?;
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
            json!({"index": index, "text": full, "logprobs": logprobs, "finish_reason": finish_reason(&outcomes, index), "stop_reason": stop_reason(&outcomes, index)})
        })
        .collect();
    let mut body = json!({
        "id": ctx.id, "object": "text_completion", "created": now_s(), "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": choices,
        "usage": openai::usage_json(&usage),
    });
    let receipt = receipt_of(receipt.as_ref(), receipt_pending.as_ref()).map(|(json, id)| {
        body["receipt"] = json;
        id
    });
    Ok((Json(body), receipt))
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
    // The echoed prompt goes first; with logprobs it waits for the prompt's logprobs, which
    // come with the first token.
    let echo_lp = ctx.logprobs && !ctx.echo_texts.is_empty();
    let head = {
        let chunk = chunk.clone();
        let n = ctx.n;
        let texts = ctx.echo_texts.clone();
        stream::iter((0..total).filter_map(move |i| {
            let text = texts.get((i / n) as usize).filter(|_| !echo_lp)?;
            Some(chunk(json!([{"index": i, "text": text, "logprobs": null, "finish_reason": null}])))
        }))
    };
    let body = {
        let chunk = chunk.clone();
        let (n, texts) = (ctx.n, ctx.echo_texts.clone());
        merged(choices).filter_map(move |(i, ev)| {
            let out = match ev {
                Event::Token { text, logprob } if !text.is_empty() || logprob.is_some() => {
                    let lp = logprob.map(|e| completion_logprobs(None, &[e]));
                    Some(chunk(json!([{"index": i, "text": text, "logprobs": lp, "finish_reason": null}])))
                }
                Event::PromptLogprobs(lp) => texts.get((i / n) as usize).map(|text| {
                    let lp = completion_logprobs(Some(&(text.clone(), lp)), &[]);
                    chunk(json!([{"index": i, "text": text, "logprobs": lp, "finish_reason": null}]))
                }),
                _ => None,
            };
            futures::future::ready(out)
        })
    };
    let tail = stream::once(done).flat_map(move |done| {
        let (outcomes, usage, receipt, pending) = done.map(|d| (d.outcomes, d.usage, d.receipt, d.receipt_pending)).unwrap_or_default();
        let mut out: Vec<Value> = Vec::new();
        if let Some(e) = engine_error(&outcomes) {
            out.push(e.body());
        }
        for i in 0..total {
            out.push(chunk(json!([{"index": i, "text": "", "logprobs": null, "finish_reason": finish_reason(&outcomes, i), "stop_reason": stop_reason(&outcomes, i)}])));
        }
        if include_usage {
            let mut u = chunk(json!([]));
            u["usage"] = openai::usage_json(&usage);
            out.push(u);
        }
        if let (Some((r, _)), Some(last)) = (receipt_of(receipt.as_ref(), pending.as_ref()), out.last_mut()) {
            last["receipt"] = r;
        }
        stream::iter(out)
    });
    head.chain(body).chain(tail)
}

// ---------------------------------------------------------------------------------------------
// models, health, metrics

/// A served model; `created` is when the node began serving it (OpenAI's is a release date).
fn model_json(m: &tokenomy_core::ModelInfo, created_s: u64) -> Value {
    json!({
        "id": m.name, "object": "model", "created": created_s, "owned_by": "tokenomy",
        "meta": {"architecture": m.architecture, "context_length": m.context_length, "sha256": m.sha256, "chat_template": m.has_chat_template},
    })
}

pub async fn list_models(State(state): State<AppState>) -> Json<Value> {
    let local = state.backend.models();
    let mut data: Vec<Value> = local.iter().map(|m| model_json(m, state.started_s)).collect();
    for (name, upstreams) in state.upstreams.as_ref().map(|u| u.models()).unwrap_or_default() {
        if !local.iter().any(|m| m.name == name) {
            data.push(upstream_model_json(&name, &upstreams, state.started_s));
        }
    }
    Json(json!({"object": "list", "data": data}))
}

/// A model served through upstreams: `owned_by` the first one tried.
fn upstream_model_json(name: &str, upstreams: &[String], created_s: u64) -> Value {
    json!({
        "id": name, "object": "model", "created": created_s,
        "owned_by": upstreams.first().map_or("upstream", String::as_str),
        "meta": {"upstreams": upstreams},
    })
}

pub async fn get_model(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>, AppError> {
    let models = state.backend.models();
    if let Some(m) = models.iter().find(|m| m.name == id) {
        return Ok(Json(model_json(m, state.started_s)));
    }
    let upstream = state.upstreams.as_ref().and_then(|u| u.models().into_iter().find(|(m, _)| *m == id));
    let (name, upstreams) = upstream.ok_or_else(|| AppError::from(tokenomy_core::BackendError::UnknownModel(id)))?;
    Ok(Json(upstream_model_json(&name, &upstreams, state.started_s)))
}

pub async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// `GET /ready`: 200 once the models are loaded and the ledger answers; 503 otherwise, so a
/// load balancer stops sending a node requests it could not charge.
pub async fn ready(State(state): State<AppState>) -> Response {
    if state.draining.load(std::sync::atomic::Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "draining"}))).into_response();
    }
    if !state.backend.ready() {
        return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "loading"}))).into_response();
    }
    if let Some(b) = &state.billing {
        if let Err(e) = b.ledger_reachable().await {
            let body = Json(json!({"status": "ledger_unavailable", "error": e.to_string()}));
            return (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "2")], body).into_response();
        }
    }
    Json(json!({"status": "ready"})).into_response()
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    let mut out = state.backend.metrics_text();
    state.meter.render(&mut out);
    if let Some(u) = &state.upstreams {
        crate::proxy::render_metrics(u, &mut out);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

pub async fn not_found(req: Request) -> Response {
    let e = AppError::not_found(format!("Unknown route: {} {}", req.method(), req.uri().path()));
    crate::anthropic::shaped_for(req.uri().path(), e)
}

/// A known route asked with a method it does not serve: 405 in the error shape of the API.
pub async fn method_not_allowed(req: Request) -> Response {
    let e = AppError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        code: Some("method_not_allowed"),
        ..AppError::invalid(format!("{} is not served at {}", req.method(), req.uri().path()), None)
    };
    crate::anthropic::shaped_for(req.uri().path(), e)
}
