//! `AppError`: every failure the HTTP API returns, in OpenAI's error shape
//! `{"error": {"message", "type", "param", "code"}}` with the matching status.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tokenomy_core::BackendError;

#[derive(Debug, Clone, PartialEq)]
pub struct AppError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    pub retry_after_s: Option<u32>,
    /// A key's rate-limit state, sent as `x-ratelimit-*` headers (on a 429 for a limit).
    pub allowance: Option<Box<tokenomy_billing::Allowance>>,
    /// The request's id where the node logged it under one (a proxied request's failure):
    /// sent as `x-request-id`, so that the operator finds the log lines the client quotes.
    pub request_id: Option<String>,
}

impl AppError {
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> AppError {
        AppError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: None,
            retry_after_s: None,
            allowance: None,
            request_id: None,
        }
    }

    pub fn invalid_value(param: &str, message: impl Into<String>) -> AppError {
        AppError { code: Some("invalid_value"), ..AppError::invalid(message, Some(param)) }
    }

    pub fn not_found(message: impl Into<String>) -> AppError {
        AppError { status: StatusCode::NOT_FOUND, code: Some("not_found"), ..AppError::invalid(message, None) }
    }

    pub fn overloaded(message: impl Into<String>) -> AppError {
        AppError {
            status: StatusCode::TOO_MANY_REQUESTS,
            kind: "rate_limit_error",
            code: Some("overloaded"),
            retry_after_s: Some(1),
            ..AppError::invalid(message, None)
        }
    }

    pub fn internal(message: impl Into<String>) -> AppError {
        AppError { status: StatusCode::INTERNAL_SERVER_ERROR, kind: "server_error", ..AppError::invalid(message, None) }
    }

    /// `Retry-After` and `x-ratelimit-*`, on the response of either API's error shape.
    pub(crate) fn add_headers(&self, resp: &mut Response) {
        if let Some(s) = self.retry_after_s {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if let Some(a) = &self.allowance {
            crate::charge::ratelimit_headers(resp, a);
        }
        if let Some(v) = self.request_id.as_deref().and_then(|id| HeaderValue::from_str(id).ok()) {
            resp.headers_mut().insert("x-request-id", v);
        }
    }

    pub fn body(&self) -> serde_json::Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl From<BackendError> for AppError {
    fn from(e: BackendError) -> AppError {
        let message = e.to_string();
        match e {
            BackendError::UnknownModel(_) => AppError {
                status: StatusCode::NOT_FOUND,
                code: Some("model_not_found"),
                ..AppError::invalid(message, Some("model"))
            },
            BackendError::ContextLength { .. } => {
                AppError { code: Some("context_length_exceeded"), ..AppError::invalid(message, Some("messages")) }
            }
            BackendError::InvalidRequest(_) => AppError::invalid(message, None),
            BackendError::InvalidParam(param, _) => AppError::invalid(message, Some(param)),
            BackendError::Overloaded(_) => AppError::overloaded(message),
            BackendError::Internal(_) => AppError::internal(message),
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.body())).into_response();
        self.add_headers(&mut resp);
        resp
    }
}

impl From<tokenomy_billing::BillingError> for AppError {
    fn from(e: tokenomy_billing::BillingError) -> AppError {
        use tokenomy_billing::BillingError as B;
        let message = e.to_string();
        let base = AppError::invalid(message, None);
        match e {
            B::Unauthorized(_) => AppError { status: StatusCode::UNAUTHORIZED, code: Some("invalid_api_key"), ..base },
            B::Forbidden(_) => AppError { status: StatusCode::FORBIDDEN, code: Some("permission_denied"), ..base },
            B::NotFound(_) => AppError { status: StatusCode::NOT_FOUND, code: Some("not_found"), ..base },
            B::Invalid(_) => AppError { code: Some("invalid_value"), ..base },
            B::InvalidParam(param, _) => AppError { code: Some("invalid_value"), param: Some(param.into()), ..base },
            B::Conflict(_) => AppError { status: StatusCode::CONFLICT, code: Some("conflict"), ..base },
            B::Idempotency { code, .. } => AppError {
                status: StatusCode::CONFLICT,
                code: Some(code),
                // Only a key still in progress is worth retrying, and soon.
                retry_after_s: (code == "idempotency_key_in_use").then_some(1),
                ..base
            },
            B::Misdirected(_) => AppError { status: StatusCode::MISDIRECTED_REQUEST, code: Some("issued_by_another_node"), ..base },
            B::InsufficientQuota { .. } => AppError {
                status: StatusCode::PAYMENT_REQUIRED,
                kind: "insufficient_quota",
                code: Some("insufficient_quota"),
                ..base
            },
            B::InsufficientFunds { .. } => AppError {
                status: StatusCode::PAYMENT_REQUIRED,
                kind: "insufficient_quota",
                code: Some("insufficient_funds"),
                ..base
            },
            B::SpendCapExceeded { .. } => AppError {
                status: StatusCode::PAYMENT_REQUIRED,
                kind: "insufficient_quota",
                code: Some("spend_cap_exceeded"),
                ..base
            },
            B::RateLimited(l) => AppError {
                status: StatusCode::TOO_MANY_REQUESTS,
                // OpenAI's type names the limit reached: "requests" or "tokens".
                kind: l.limit,
                code: Some("rate_limit_exceeded"),
                retry_after_s: Some(u32::try_from(((l.retry_after_ms + 999) / 1000).max(1)).unwrap_or(u32::MAX)),
                allowance: Some(Box::new(l.allowance)),
                ..base
            },
            B::RequestTooLarge { .. } => AppError {
                status: StatusCode::TOO_MANY_REQUESTS,
                kind: "tokens",
                code: Some("rate_limit_exceeded"),
                ..base
            },
            B::LogRewritten(_) => AppError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                kind: "server_error",
                code: Some("ledger_log_rewritten"),
                ..base
            },
            B::Unavailable(detail) => {
                // The store's own words (a driver's "connection refused", a host) are the
                // operator's, in the log; the client learns what to do.
                tracing::warn!(error = %detail, "the ledger is unavailable");
                AppError {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    kind: "server_error",
                    code: Some("ledger_unavailable"),
                    retry_after_s: Some(2),
                    message: "The ledger is unavailable; retry shortly.".into(),
                    ..base
                }
            }
            B::Internal(_) | B::SettlementDeferred { .. } => AppError::internal(base.message),
        }
    }
}
