//! The HTTP front end: OpenAI-compatible routes over any [`Backend`].
//!
//! Shaped like axum's examples and TGI's router: `app(state) -> Router`, handlers that turn a
//! wire request into a validated [`GenerateRequest`], a [`Backend`] that streams events, and
//! an [`AppError`] that renders every failure in OpenAI's error shape. Usage is recorded by a
//! task spawned per request that awaits the engine's final outcome, not by the response
//! stream, so a client that disconnects mid-stream is still metered.
//!
//! Architecture Invariant: this is the only crate that knows axum and OpenAI's JSON.

mod anthropic;
mod charge;
mod console;
mod embeddings;
mod proxy;
pub mod error;
pub mod openai;
mod responses;
mod routes;
mod server;
mod usage;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post, put};
use axum::Router;
use tokenomy_billing::{Billing, ReceiptRef};
use tokenomy_core::{Backend, Outcome, Usage};
use tokio_util::task::TaskTracker;

pub use error::AppError;
pub use server::{serve_with_limits, ServeLimits};

/// Settings of the HTTP layer.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub body_bytes_max: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig { body_bytes_max: 4 * 1024 * 1024 }
    }
}

/// Totals of what was metered, by model, from engine outcomes (also for disconnected clients)
/// and upstream answers.
#[derive(Debug, Default)]
pub struct Meter {
    models: Mutex<std::collections::BTreeMap<String, Metered>>,
    /// Responses by route template and status code, refusals (402, 429, 503) included.
    responses: Mutex<std::collections::BTreeMap<(String, u16), u64>>,
    /// The closed API whose list price the usage is compared with (`[reference]`), if any.
    reference: std::sync::OnceLock<(String, tokenomy_ledger::Price)>,
}

/// Models counted under their own name at most; the rest count under `other`. (Requests name
/// only served models, local or upstream, so this is a guard, not a working limit.)
pub const METERED_MODELS_MAX: usize = 1_000;

/// One model's counters (or their sum).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Metered {
    pub requests: u64,
    pub prompt_tokens: u64,
    pub cached_tokens: u64,
    pub completion_tokens: u64,
    /// Requests whose client went away.
    pub cancelled: u64,
    /// Micro-credits posted for usage.
    pub charged_micros: u64,
    /// What the usage would have cost at the reference list price.
    pub reference_micros: u64,
}

impl Meter {
    fn record(&self, request_id: &str, model: &str, outcomes: &[Outcome], usage: &Usage, receipt: Option<&ReceiptRef>) {
        if outcomes.is_empty() {
            return;
        }
        let cancelled = outcomes.iter().any(|o| o.finish_reason == tokenomy_core::FinishReason::Cancelled);
        self.record_usage(request_id, model, usage, receipt, cancelled);
    }

    /// Counts one request's usage (served here or by an upstream).
    fn record_usage(&self, request_id: &str, model: &str, usage: &Usage, receipt: Option<&ReceiptRef>, cancelled: bool) {
        let reference = self.reference_cost(usage);
        {
            let mut models = self.models.lock().expect("meter lock");
            let name = if models.len() < METERED_MODELS_MAX || models.contains_key(model) { model } else { "other" };
            let m = models.entry(name.to_string()).or_default();
            m.requests += 1;
            m.prompt_tokens += u64::from(usage.prompt_tokens);
            m.cached_tokens += u64::from(usage.cached_tokens);
            m.completion_tokens += u64::from(usage.completion_tokens);
            m.cancelled += u64::from(cancelled);
            m.charged_micros += receipt.map_or(0, |r| r.amount_micros.max(0) as u64);
            m.reference_micros += reference;
        }
        let (prompt_tokens, cached_tokens, completion_tokens) = (usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens);
        tracing::info!(request_id, model, prompt_tokens, cached_tokens, completion_tokens, cancelled, "metered");
    }

    /// The counters of every model, added up.
    pub fn totals(&self) -> Metered {
        let models = self.models.lock().expect("meter lock");
        models.values().fold(Metered::default(), |mut t, m| {
            t.requests += m.requests;
            t.prompt_tokens += m.prompt_tokens;
            t.cached_tokens += m.cached_tokens;
            t.completion_tokens += m.completion_tokens;
            t.cancelled += m.cancelled;
            t.charged_micros += m.charged_micros;
            t.reference_micros += m.reference_micros;
            t
        })
    }

    /// What `usage` would cost at the reference list price (0 without one).
    fn reference_cost(&self, usage: &Usage) -> u64 {
        let Some((_, price)) = self.reference.get() else { return 0 };
        let u = tokenomy_ledger::Usage::from_openai(usage.prompt_tokens.into(), usage.cached_tokens.into(), usage.completion_tokens.into(), usage.reasoning_tokens.into());
        tokenomy_ledger::cost_micros(u, *price).map_or(0, |c| c.max(0) as u64)
    }

    /// Counts one response of a route template (or `other`).
    fn count_response(&self, route: String, status: u16) {
        *self.responses.lock().expect("meter lock").entry((route, status)).or_default() += 1;
    }

    fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let name = "tokenomy_http_responses_total";
        let _ = writeln!(out, "# HELP {name} HTTP responses by route and status code (a stream counts at its head)\n# TYPE {name} counter");
        for ((route, code), n) in self.responses.lock().expect("meter lock").iter() {
            let _ = writeln!(out, "{name}{{route=\"{route}\",code=\"{code}\"}} {n}");
        }
        let models = self.models.lock().expect("meter lock");
        let series: [(&str, &str, fn(&Metered) -> u64); 6] = [
            ("tokenomy_metered_requests_total", "Requests metered", |m| m.requests),
            ("tokenomy_metered_prompt_tokens_total", "Prompt tokens metered", |m| m.prompt_tokens),
            ("tokenomy_metered_cached_tokens_total", "Cached prompt tokens metered", |m| m.cached_tokens),
            ("tokenomy_metered_completion_tokens_total", "Completion tokens metered", |m| m.completion_tokens),
            ("tokenomy_cancelled_requests_total", "Requests whose client went away", |m| m.cancelled),
            ("tokenomy_charged_micros_total", "Micro-credits posted for usage", |m| m.charged_micros),
        ];
        for (name, help, value) in series {
            let _ = writeln!(out, "# HELP {name} {help}, by model\n# TYPE {name} counter");
            for (model, m) in models.iter() {
                let _ = writeln!(out, "{name}{{model=\"{}\"}} {}", label_value(model), value(m));
            }
        }
        if let Some((reference, _)) = self.reference.get() {
            let name = "tokenomy_reference_cost_micros_total";
            let _ = writeln!(out, "# HELP {name} What the metered usage would have cost at the reference list price, by model\n# TYPE {name} counter");
            for (model, m) in models.iter() {
                let _ = writeln!(out, "{name}{{reference=\"{}\",model=\"{}\"}} {}", label_value(reference), label_value(model), m.reference_micros);
            }
        }
    }
}

/// A Prometheus label value: backslash, quote and newline escaped.
fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Shared state of all handlers.
#[derive(Clone)]
pub struct AppState {
    pub backend: Arc<dyn Backend>,
    pub config: ApiConfig,
    pub meter: Arc<Meter>,
    /// Metering tasks; awaited at shutdown so no usage is lost.
    pub tasks: TaskTracker,
    /// The ledger, keys and receipts log; `None` serves without accounts or charges.
    pub billing: Option<Arc<Billing>>,
    /// Requests without a key are charged to the local user (`DATA_DIR/user.key`).
    pub no_auth: bool,
    idempotency: Arc<charge::IdempotencyCache>,
    /// Responses kept for `previous_response_id` (`store`): in memory, or in a PostgreSQL
    /// ledger's database.
    responses: Arc<responses::ResponseStore>,
    /// When this node began serving (Unix seconds): its models' `created`.
    started_s: u64,
    /// Set at a graceful shutdown's start: `/ready` answers 503 from then on.
    draining: Arc<std::sync::atomic::AtomicBool>,
    /// Remote providers serving the models the local engine does not.
    pub upstreams: Option<Arc<tokenomy_upstream::Upstreams>>,
}

impl AppState {
    /// A node that serves without charging (no ledger).
    pub fn new(backend: Arc<dyn Backend>, config: ApiConfig) -> AppState {
        AppState {
            backend,
            config,
            meter: Arc::new(Meter::default()),
            tasks: TaskTracker::new(),
            billing: None,
            no_auth: false,
            idempotency: Default::default(),
            responses: Default::default(),
            draining: Default::default(),
            upstreams: None,
            started_s: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        }
    }

    /// A node that authenticates every request and charges it to the caller's account.
    pub fn with_billing(self, billing: Arc<Billing>, no_auth: bool) -> AppState {
        if let Some(r) = &billing.config().reference {
            let _ = self.meter.reference.set((r.name.clone(), r.price()));
        }
        // On a PostgreSQL ledger, kept responses are in its database, for every node of it.
        let responses = match billing.store() {
            tokenomy_ledger::AnyStore::Pg(pg) => Arc::new(responses::ResponseStore::shared(pg.clone())),
            tokenomy_ledger::AnyStore::Sqlite(_) => self.responses.clone(),
        };
        AppState { billing: Some(billing), no_auth, responses, ..self }
    }

    /// Serves the models of `upstreams` that the local engine does not, through them.
    pub fn with_upstreams(self, upstreams: Arc<tokenomy_upstream::Upstreams>) -> AppState {
        AppState { upstreams: (!upstreams.is_empty()).then_some(upstreams), ..self }
    }

    /// Makes `/ready` answer 503 (`draining`): the node is shutting down and takes requests
    /// only until its listener closes.
    pub fn start_draining(&self) {
        self.draining.store(true, Relaxed);
    }

    /// Waits (bounded) for outstanding metering tasks.
    pub async fn drain(&self, wait_max: Duration) -> bool {
        self.tasks.close();
        tokio::time::timeout(wait_max, self.tasks.wait()).await.is_ok()
    }
}

/// Serves `app(state)` on `listener` until `shutdown` resolves, then lets in-flight requests
/// finish (streams included); with the default [`ServeLimits`].
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    server::serve_with_limits(listener, state, shutdown, ServeLimits::default()).await
}

pub fn app(state: AppState) -> Router {
    let body_max = state.config.body_bytes_max;
    // API Boundary: every route that takes a key checks it before its handler reads the body.
    let keyed = Router::new()
        .route("/v1/chat/completions", post(routes::chat_completions))
        .route("/v1/completions", post(routes::completions))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route("/v1/responses", post(responses::create))
        .route("/v1/responses/{id}", get(responses::get).delete(responses::delete))
        .route("/v1/responses/{id}/input_items", get(responses::input_items))
        .route("/v1/responses/input_tokens", post(responses::input_tokens))
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/messages/count_tokens", post(anthropic::count_tokens))
        .route("/v1/me", get(charge::me))
        .route("/v1/me/transfers", get(charge::my_transfers))
        .route("/v1/me/usage", get(usage::mine))
        .route("/v1/transfers", post(charge::send_credits))
        .route("/v1/receipts/{id}", get(charge::get_receipt))
        .route("/admin/v1/accounts", post(charge::create_account).get(charge::list_accounts))
        .route("/admin/v1/accounts/{id}", get(charge::get_account))
        .route("/admin/v1/accounts/{id}/keys", post(charge::create_key).get(charge::list_keys))
        .route("/admin/v1/accounts/{id}/mint", post(charge::mint))
        .route("/admin/v1/accounts/{id}/transfers", get(charge::account_transfers))
        .route("/admin/v1/keys/{id}", get(charge::get_key).delete(charge::revoke_key))
        .route("/admin/v1/keys/{id}/limits", put(charge::set_key_limits).patch(charge::patch_key_limits))
        .route("/admin/v1/transfers", post(charge::transfer))
        .route("/admin/v1/receipts/{id}/refund", post(charge::refund))
        .route("/admin/v1/ledger/check", get(charge::ledger_check))
        .route("/admin/v1/usage", get(usage::ledger))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), charge::authenticate_first));
    Router::new()
        .route("/v1/models", get(routes::list_models))
        .route("/v1/models/{*id}", get(routes::get_model))
        .route("/health", get(routes::health))
        .route("/ready", get(routes::ready))
        .route("/metrics", get(routes::metrics))
        .route("/v1/log/checkpoint", get(charge::checkpoint))
        .route("/v1/log/consistency", get(charge::consistency))
        .route("/v1/node/key", get(charge::node_key))
        .route("/v1/node/keys", get(charge::node_keys))
        .route("/", get(console::root))
        .route("/console", get(console::root))
        .route("/console/", get(console::index))
        .route("/console/{file}", get(console::asset))
        .merge(keyed)
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(DefaultBodyLimit::max(body_max))
        .layer(axum::middleware::from_fn(move |req, next| refuse_declared_too_large(body_max, req, next)))
        .layer(axum::middleware::map_response(with_a_request_id))
        .layer(axum::middleware::from_fn_with_state(state.meter.clone(), count_response))
        .with_state(state)
}

/// A body whose `Content-Length` is past the limit is refused at once (`413`), before a byte
/// of it is read: the client is not left sending it, nor the connection held until the body
/// timeout.
async fn refuse_declared_too_large(body_max: usize, req: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    let declared = req.headers().get(axum::http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(n) if n > body_max as u64 => {
            let message = format!("The request body is too large: {n} bytes declared, at most {body_max} are taken (--body-bytes-max)");
            let e = AppError { status: axum::http::StatusCode::PAYLOAD_TOO_LARGE, code: Some("request_too_large"), ..AppError::invalid(message, None) };
            anthropic::shaped_for(req.uri().path(), e)
        }
        _ => next.run(req).await,
    }
}

/// Counts every response in [`Meter`] by the route it matched and its status.
async fn count_response(
    axum::extract::State(meter): axum::extract::State<Arc<Meter>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    // A matched path is one of the router's templates, so the series stay bounded.
    let route = req.extensions().get::<axum::extract::MatchedPath>().map_or("other".into(), |m| m.as_str().to_owned());
    let resp = next.run(req).await;
    meter.count_response(route, resp.status().as_u16());
    resp
}

/// Every response names a request id (`x-request-id`), errors and replays included, as
/// OpenAI's do: a generation's own id where it has one, a fresh one of the same form (32 hex
/// digits) otherwise.
async fn with_a_request_id(mut resp: axum::response::Response) -> axum::response::Response {
    if !resp.headers().contains_key("x-request-id") {
        let id = uuid::Uuid::new_v4().simple().to_string();
        if let Ok(v) = axum::http::HeaderValue::from_str(&id) {
            resp.headers_mut().insert("x-request-id", v);
        }
    }
    resp
}
