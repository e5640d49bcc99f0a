//! The HTTP front end: OpenAI-compatible routes over any [`Backend`].
//!
//! Shaped like axum's examples and TGI's router: `app(state) -> Router`, handlers that turn a
//! wire request into a validated [`GenerateRequest`], a [`Backend`] that streams events, and
//! an [`AppError`] that renders every failure in OpenAI's error shape. Usage is recorded by a
//! task spawned per request that awaits the engine's final outcome, not by the response
//! stream, so a client that disconnects mid-stream is still metered.
//!
//! Architecture Invariant: this is the only crate that knows axum and OpenAI's JSON.

pub mod error;
pub mod openai;
mod routes;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use tokenomy_core::{Backend, Outcome};
use tokio_util::task::TaskTracker;

pub use error::AppError;

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

/// Totals of what was metered, from engine outcomes (also for disconnected clients).
#[derive(Debug, Default)]
pub struct Meter {
    pub requests: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub cached_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    pub cancelled: AtomicU64,
}

impl Meter {
    fn record(&self, request_id: &str, model: &str, outcomes: &[Outcome]) {
        let Some(first) = outcomes.first() else { return };
        let completion: u32 = outcomes.iter().map(|o| o.usage.completion_tokens).sum();
        self.requests.fetch_add(1, Relaxed);
        self.prompt_tokens.fetch_add(first.usage.prompt_tokens.into(), Relaxed);
        self.cached_tokens.fetch_add(first.usage.cached_tokens.into(), Relaxed);
        self.completion_tokens.fetch_add(completion.into(), Relaxed);
        let cancelled = outcomes.iter().any(|o| o.finish_reason == tokenomy_core::FinishReason::Cancelled);
        if cancelled {
            self.cancelled.fetch_add(1, Relaxed);
        }
        tracing::info!(request_id, model, prompt_tokens = first.usage.prompt_tokens, cached_tokens = first.usage.cached_tokens, completion_tokens = completion, cancelled, "metered");
    }

    fn render(&self, out: &mut String) {
        use std::fmt::Write;
        for (name, v, help) in [
            ("tokenomy_metered_requests_total", &self.requests, "Requests metered"),
            ("tokenomy_metered_prompt_tokens_total", &self.prompt_tokens, "Prompt tokens metered"),
            ("tokenomy_metered_cached_tokens_total", &self.cached_tokens, "Cached prompt tokens metered"),
            ("tokenomy_metered_completion_tokens_total", &self.completion_tokens, "Completion tokens metered"),
            ("tokenomy_cancelled_requests_total", &self.cancelled, "Requests whose client went away"),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", v.load(Relaxed));
        }
    }
}

/// Shared state of all handlers.
#[derive(Clone)]
pub struct AppState {
    pub backend: Arc<dyn Backend>,
    pub config: ApiConfig,
    pub meter: Arc<Meter>,
    /// Metering tasks; awaited at shutdown so no usage is lost.
    pub tasks: TaskTracker,
}

impl AppState {
    pub fn new(backend: Arc<dyn Backend>, config: ApiConfig) -> AppState {
        AppState { backend, config, meter: Arc::new(Meter::default()), tasks: TaskTracker::new() }
    }

    /// Waits (bounded) for outstanding metering tasks.
    pub async fn drain(&self, wait_max: Duration) -> bool {
        self.tasks.close();
        tokio::time::timeout(wait_max, self.tasks.wait()).await.is_ok()
    }
}

/// Serves `app(state)` on `listener` until `shutdown` resolves, then lets in-flight requests
/// finish (streams included).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app(state)).with_graceful_shutdown(shutdown).await
}

pub fn app(state: AppState) -> Router {
    let body_max = state.config.body_bytes_max;
    Router::new()
        .route("/v1/chat/completions", post(routes::chat_completions))
        .route("/v1/completions", post(routes::completions))
        .route("/v1/models", get(routes::list_models))
        .route("/v1/models/{*id}", get(routes::get_model))
        .route("/health", get(routes::health))
        .route("/ready", get(routes::ready))
        .route("/metrics", get(routes::metrics))
        .fallback(routes::not_found)
        .layer(DefaultBodyLimit::max(body_max))
        .with_state(state)
}
