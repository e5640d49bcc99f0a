//! The web console: one static page (`console/`, compiled into the binary) over the node's
//! public API, for people who hold a key: their balance and ledger, a playground that streams
//! tokens and shows what they cost, and a receipt verifier that runs in the browser.
//!
//! API Boundary: the page calls only the endpoints every client calls (`/v1/me`,
//! `/v1/me/transfers`, `/v1/receipts/{id}`, `/v1/chat/completions`, `/v1/node/key`,
//! `/v1/log/consistency`), with the key the user typed; the node serves files and nothing
//! else here. Its verifier (`console/verify.js`) is a second implementation of
//! `tokenomy-receipts`' checks, so a receipt can be checked by code the node did not run.
//!
//! The files are served with a strict Content-Security-Policy (scripts and connections to
//! this origin only, no inline script, no framing), so a key typed into the page can only
//! be sent to this node.

use axum::extract::Path;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};

use crate::AppError;

const INDEX_HTML: &str = include_str!("../console/index.html");
const APP_JS: &str = include_str!("../console/app.js");
const VERIFY_JS: &str = include_str!("../console/verify.js");
const STYLE_CSS: &str = include_str!("../console/style.css");

/// The policy every console file is served with.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
    style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
    form-action 'none'; frame-ancestors 'none'";

/// `GET /`: a browser landing on the node goes to the console.
pub async fn root() -> Redirect {
    Redirect::to("/console/")
}

/// `GET /console/`: the page.
pub async fn index() -> Response {
    file("text/html; charset=utf-8", INDEX_HTML)
}

/// `GET /console/{file}`: the page's script and style sheet.
pub async fn asset(Path(name): Path<String>) -> Result<Response, AppError> {
    match name.as_str() {
        "app.js" => Ok(file("text/javascript; charset=utf-8", APP_JS)),
        "verify.js" => Ok(file("text/javascript; charset=utf-8", VERIFY_JS)),
        "style.css" => Ok(file("text/css; charset=utf-8", STYLE_CSS)),
        "" | "index.html" => Ok(index().await),
        _ => Err(AppError::not_found(format!("Unknown console file: {name}"))),
    }
}

fn file(content_type: &'static str, body: &'static str) -> Response {
    let mut resp = (StatusCode::OK, body).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // The files change with the binary; revalidating costs one small request.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}
