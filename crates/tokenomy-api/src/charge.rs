//! The billing side of the HTTP API: who is calling, the `Idempotency-Key` replay cache, the
//! admin API (`/admin/v1/…`), `/v1/me`, and the public receipts log (`/v1/receipts/{id}`,
//! `/v1/log/…`, `/v1/node/key`). The policy itself lives in `tokenomy-billing`; this module
//! only translates HTTP to it and back.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use tokenomy_billing::{parse_account_id, parse_account_kind, parse_key_id, Allowance, Billing, Principal, ReceiptRef};
use tokenomy_ledger::{Account, AccountId, KeyLimitsChange, KeyRecord, KeySpend, SpendCaps, Transfer};

use crate::routes::{ApiJson, ApiQuery};
use crate::{AppError, AppState};

/// The API key: `Authorization: Bearer …` (OpenAI) or `x-api-key: …` (Anthropic).
/// Two different keys in one request (two `Authorization` headers, or one there and another
/// in `x-api-key`) are no key the caller can be held to: they authenticate as this, which no
/// key is.
const CONFLICTING_KEYS: &str = "tk-conflicting-keys-in-one-request";

/// The credentials of an `Authorization` value in the `Bearer` scheme, whose name is
/// case-insensitive (RFC 9110 §11.1), or `None` for another scheme.
fn bearer_credentials(value: &str) -> Option<&str> {
    let (scheme, credentials) = value.trim_start().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| credentials.trim())
}

pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let mut given = headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .map(|v| v.to_str().ok().and_then(bearer_credentials))
        .chain(headers.get_all("x-api-key").iter().map(|v| v.to_str().ok().map(str::trim)));
    let first = given.next()?;
    if given.any(|k| k != first) {
        return Some(CONFLICTING_KEYS);
    }
    first
}

tokio::task_local! {
    /// The key [`authenticate_first`] found for the request being handled.
    static AUTHENTICATED: Principal;
}

/// Middleware of every route that takes a key: checks the key before the handler reads the
/// body, so a request without a valid key gets 401 whatever its body holds (a malformed body
/// must not tell an unauthenticated caller what the route expects). The handler gets the key
/// back from [`authenticate`] without a second lookup. Keyless requests pass through where
/// keys are not required (no ledger, or `--no-auth` without a key); the handler decides.
pub(crate) async fn authenticate_first(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(b) = &state.billing else { return next.run(req).await };
    if keyless(state.no_auth, req.headers()) {
        return next.run(req).await;
    }
    match b.authenticate(bearer(req.headers())).await {
        Ok(p) => AUTHENTICATED.scope(p, next.run(req)).await,
        Err(e) if req.uri().path().starts_with("/v1/messages") => crate::anthropic::AnthropicError::from(AppError::from(e)).into_response(),
        Err(e) => AppError::from(e).into_response(),
    }
}

/// The key of `headers`: the one [`authenticate_first`] checked for this request, else a
/// lookup (a handler called without the middleware).
async fn authenticate(b: &Billing, headers: &HeaderMap) -> Result<Principal, AppError> {
    if let Ok(p) = AUTHENTICATED.try_with(Principal::clone) {
        return Ok(p);
    }
    Ok(b.authenticate(bearer(headers)).await?)
}

/// The caller of an inference route: `None` when the node does not bill (no ledger).
pub(crate) async fn caller(state: &AppState, headers: &HeaderMap) -> Result<Option<Principal>, AppError> {
    match state.billing {
        Some(_) => principal(state, headers).await.map(Some),
        None => Ok(None),
    }
}

/// Whether a request is keyless under `--no-auth`: it has no key, or a placeholder that is no
/// tokenomy key at all (`api_key="none"`: the official SDKs refuse to send none). A `tk-…` key
/// is checked, so a mistyped real key is a 401.
fn keyless(no_auth: bool, headers: &HeaderMap) -> bool {
    no_auth && !bearer(headers).is_some_and(|k| k.starts_with(tokenomy_billing::keys::KEY_PREFIX))
}

/// Whose request this is: the key's owner, or under `--no-auth` a keyless request's local
/// user (who is charged for it, so `/v1/me` and its receipts are theirs too).
pub(crate) async fn principal(state: &AppState, headers: &HeaderMap) -> Result<Principal, AppError> {
    let b = billing(state)?;
    if keyless(state.no_auth, headers) {
        return Ok(b.local_principal().await?);
    }
    authenticate(b, headers).await
}

/// The caller of an admin route, who must hold the admin scope.
pub(crate) async fn admin(state: &AppState, headers: &HeaderMap) -> Result<Principal, AppError> {
    let p = authenticate(billing(state)?, headers).await?;
    if !p.is_admin() {
        return Err(tokenomy_billing::BillingError::Forbidden("This route needs a key with the \"admin\" scope.".into()).into());
    }
    Ok(p)
}

pub(crate) fn billing(state: &AppState) -> Result<&tokenomy_billing::Billing, AppError> {
    state.billing.as_deref().ok_or_else(|| AppError::not_found("This node runs without a ledger."))
}

pub(crate) fn ratelimit_headers(resp: &mut Response, a: &Allowance) {
    let h = resp.headers_mut();
    let mut put = |name: &'static str, v: String| {
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.insert(name, v);
        }
    };
    if let Some(l) = a.limit_requests {
        put("x-ratelimit-limit-requests", l.to_string());
        put("x-ratelimit-remaining-requests", a.remaining_requests.to_string());
        put("x-ratelimit-reset-requests", format!("{}ms", a.reset_requests_ms.max(0)));
    }
    if let Some(l) = a.limit_tokens {
        put("x-ratelimit-limit-tokens", l.to_string());
        put("x-ratelimit-remaining-tokens", a.remaining_tokens.to_string());
        put("x-ratelimit-reset-tokens", format!("{}ms", a.reset_tokens_ms.max(0)));
    }
}

pub(crate) fn receipt_json(r: &ReceiptRef) -> Value {
    json!({
        "id": r.receipt_id, "log_index": r.log_index, "amount_micros": r.amount_micros,
        "transfer_id": r.transfer_id, "url": format!("/v1/receipts/{}", r.receipt_id),
    })
}

// ---------------------------------------------------------------------------------------------
// Idempotency-Key: the first response of a key is kept (bounded) and replayed to retries.

/// Completed responses kept for replay, oldest dropped first.
pub const IDEMPOTENT_RESPONSES_MAX: usize = 10_000;
/// ...and their bodies' bytes in all, so that a client sending large answers' worth of keys
/// cannot grow the node's memory without bound.
pub const IDEMPOTENT_RESPONSES_BYTES_MAX: usize = 256 << 20;
pub const IDEMPOTENCY_KEY_LEN_MAX_BYTES: usize = 64;

/// The headers of a kept answer that its replays carry too.
const REPLAYED_HEADERS: [&str; 3] = ["x-request-id", "tokenomy-receipt", "tokenomy-upstream"];

#[derive(Clone)]
enum Slot {
    /// `owner` tells this run's slot from a later run's with the same key (see [`Begin::Run`]).
    InFlight { request_sha256: [u8; 32], owner: u64 },
    /// `headers`: the answer's request id and receipt, replayed with it.
    Done { request_sha256: [u8; 32], status: StatusCode, body: bytes::Bytes, headers: Vec<(&'static str, HeaderValue)> },
}

#[derive(Default)]
pub struct IdempotencyCache {
    /// The slots, the order the answers were kept in, and the kept bodies' bytes.
    inner: Mutex<(HashMap<(AccountId, String), Slot>, VecDeque<(AccountId, String)>, usize)>,
    owners: std::sync::atomic::AtomicU64,
}

pub(crate) enum Begin {
    /// First time: run it, then call `finish` or `abandon` with this owner.
    Run(u64),
    Replay(Response),
}

impl IdempotencyCache {
    pub(crate) fn begin(&self, account: AccountId, key: &str, request_sha256: [u8; 32]) -> Result<Begin, AppError> {
        let mut g = self.inner.lock().expect("idempotency lock");
        let first_sha = match g.0.get(&(account, key.to_string())) {
            Some(Slot::InFlight { request_sha256, .. } | Slot::Done { request_sha256, .. }) => Some(*request_sha256),
            None => None,
        };
        if first_sha.is_some_and(|s| s != request_sha256) {
            return Err(AppError {
                status: StatusCode::CONFLICT,
                code: Some("idempotency_key_reused"),
                ..AppError::invalid("This Idempotency-Key was already used with a different request (another body or another route).", None)
            });
        }
        match g.0.get(&(account, key.to_string())) {
            Some(Slot::InFlight { .. }) => Err(AppError {
                status: StatusCode::CONFLICT,
                code: Some("idempotency_key_in_use"),
                retry_after_s: Some(1),
                ..AppError::invalid("A request with this Idempotency-Key is still in progress; retry when it has finished.", None)
            }),
            Some(Slot::Done { status, body, headers, .. }) => {
                let mut r = (*status, body.clone()).into_response();
                for (name, value) in headers {
                    r.headers_mut().insert(*name, value.clone());
                }
                r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
                r.headers_mut().insert("idempotent-replayed", HeaderValue::from_static("true"));
                Ok(Begin::Replay(r))
            }
            None => {
                let owner = self.owners.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                g.0.insert((account, key.to_string()), Slot::InFlight { request_sha256, owner });
                Ok(Begin::Run(owner))
            }
        }
    }

    pub(crate) fn finish(&self, account: AccountId, key: &str, request_sha256: [u8; 32], status: StatusCode, body: bytes::Bytes, from: &HeaderMap) {
        let headers = REPLAYED_HEADERS.iter().filter_map(|&name| Some((name, from.get(name)?.clone()))).collect();
        let mut g = self.inner.lock().expect("idempotency lock");
        let k = (account, key.to_string());
        g.2 += body.len();
        if let Some(Slot::Done { body: replaced, .. }) = g.0.insert(k.clone(), Slot::Done { request_sha256, status, body, headers }) {
            g.2 -= replaced.len();
        }
        g.1.push_back(k);
        while g.1.len() > IDEMPOTENT_RESPONSES_MAX || (g.2 > IDEMPOTENT_RESPONSES_BYTES_MAX && g.1.len() > 1) {
            let Some(old) = g.1.pop_front() else { break };
            if let Some(Slot::Done { body, .. }) = g.0.remove(&old) {
                g.2 -= body.len();
            }
        }
    }

    /// Kept answers and their bodies' bytes.
    #[cfg(test)]
    fn kept(&self) -> (usize, usize) {
        let g = self.inner.lock().expect("idempotency lock");
        (g.1.len(), g.2)
    }

    /// Forgets the key's run `owner` if it is still in flight (a run that finished, or a later
    /// run of the same key, is left alone).
    pub(crate) fn abandon(&self, account: AccountId, key: &str, owner: u64) {
        let mut g = self.inner.lock().expect("idempotency lock");
        if matches!(g.0.get(&(account, key.to_string())), Some(Slot::InFlight { owner: o, .. }) if *o == owner) {
            g.0.remove(&(account, key.to_string()));
        }
    }
}

pub(crate) fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, AppError> {
    let Some(v) = headers.get("idempotency-key") else { return Ok(None) };
    if headers.get_all("idempotency-key").iter().nth(1).is_some() {
        // Which one would be the request's? A retry sending either must not run it twice.
        return Err(AppError::invalid("more than one Idempotency-Key header: send one", None));
    }
    let s = v.to_str().map_err(|_| AppError::invalid("Idempotency-Key must be visible ASCII", None))?;
    if s.is_empty() || s.len() > IDEMPOTENCY_KEY_LEN_MAX_BYTES || !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(AppError::invalid(format!("Idempotency-Key must be 1..={IDEMPOTENCY_KEY_LEN_MAX_BYTES} visible ASCII characters"), None));
    }
    Ok(Some(s.to_string()))
}

// ---------------------------------------------------------------------------------------------
// JSON shapes

fn account_json(a: &Account) -> Value {
    json!({
        "id": a.id.to_string(), "object": "account", "name": a.name, "kind": a.kind.api_name(),
        "balance_micros": a.balance_micros, "pending_micros": a.pending_micros,
        "available_micros": a.available_micros(), "created_at_ms": a.created_at_ms,
    })
}

fn transfer_json(t: &Transfer) -> Value {
    json!({
        "id": t.id.to_string(), "object": "transfer", "idempotency_key": t.idempotency_key,
        "from": t.debit_account.to_string(), "to": t.credit_account.to_string(),
        "amount_micros": t.amount_micros, "code": format!("{:?}", t.code).to_lowercase(),
        "state": format!("{:?}", t.state).to_lowercase(), "created_at_ms": t.created_at_ms,
        "is_hold": t.hold, "expires_at_ms": t.hold.then_some(t.expires_at_ms),
        "pending_id": t.pending_id.map(|p| p.to_string()),
    })
}

fn key_json(k: &KeyRecord) -> Value {
    json!({
        "key_id": k.id.to_string(), "account_id": k.account.to_string(), "scopes": k.scopes,
        "rpm": k.rpm, "tpm": k.tpm, "created_at_ms": k.created_at_ms, "revoked_at_ms": k.revoked_at_ms,
        "spend_cap_day_micros": k.caps.day_micros, "spend_cap_month_micros": k.caps.month_micros,
        "spend": spend_json(k.caps, k.spend),
    })
}

/// A key's spend this UTC day and month (0 once a period has passed) and its holds in flight.
/// Counted only for keys with a cap (`null` otherwise).
fn spend_json(caps: SpendCaps, spend: KeySpend) -> Value {
    if !caps.is_capped() {
        return Value::Null;
    }
    let s = spend.at(tokenomy_ledger::now_ms());
    let left = |cap: Option<i64>, spent: i64| cap.map(|c: i64| c.saturating_sub(spent).saturating_sub(s.pending_micros).max(0));
    json!({
        "day_micros": s.day_micros, "month_micros": s.month_micros, "pending_micros": s.pending_micros,
        "day_remaining_micros": left(caps.day_micros, s.day_micros),
        "month_remaining_micros": left(caps.month_micros, s.month_micros),
    })
}

// ---------------------------------------------------------------------------------------------
// Admin API

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewAccount {
    name: String,
    kind: String,
}

pub async fn create_account(State(state): State<AppState>, headers: HeaderMap, ApiJson(req): ApiJson<NewAccount>) -> Result<Response, AppError> {
    admin(&state, &headers).await?;
    let kind = parse_account_kind(&req.kind)?;
    let a = billing(&state)?.create_account(&req.name, kind).await?;
    Ok((StatusCode::CREATED, Json(account_json(&a))).into_response())
}

pub async fn get_account(State(state): State<AppState>, headers: HeaderMap, Path(id): Path<String>) -> Result<Json<Value>, AppError> {
    admin(&state, &headers).await?;
    let a = billing(&state)?.account(parse_account_id(&id)?).await?;
    Ok(Json(account_json(&a)))
}

#[derive(Deserialize)]
pub struct AccountsQuery {
    after: Option<String>,
    limit: Option<u32>,
    /// Only the accounts of this name (one, since names are unique; a ledger from before they
    /// were may have more), in one answer.
    name: Option<String>,
}

/// `GET /admin/v1/accounts`: every account in id order (creation order), a page at a time, or
/// those of one `name`.
pub async fn list_accounts(State(state): State<AppState>, headers: HeaderMap, ApiQuery(q): ApiQuery<AccountsQuery>) -> Result<Json<Value>, AppError> {
    admin(&state, &headers).await?;
    if let Some(name) = &q.name {
        let b = billing(&state)?;
        let (mut named, mut after) = (Vec::new(), None);
        loop {
            let page = b.accounts(after, tokenomy_ledger::MAX_PAGE_LEN).await?;
            named.extend(page.iter().filter(|a| &a.name == name).map(account_json));
            match page.last() {
                Some(last) if page.len() == tokenomy_ledger::MAX_PAGE_LEN as usize => after = Some(last.id),
                _ => return Ok(Json(json!({"object": "list", "data": named, "next_after": null, "has_more": false}))),
            }
        }
    }
    let after = q.after.as_deref().map(parse_account_id).transpose()?;
    let limit = q.limit.unwrap_or(100);
    let b = billing(&state)?;
    let page = b.accounts(after, limit).await?;
    // A full page has a next one only if an account follows it (an exactly full last page has none).
    let last = page.last().filter(|_| page.len() == limit as usize).map(|a| a.id);
    let more = match last {
        Some(id) => !b.accounts(Some(id), 1).await?.is_empty(),
        None => false,
    };
    let next = last.filter(|_| more).map(|id| id.to_string());
    Ok(Json(json!({
        "object": "list", "data": page.iter().map(account_json).collect::<Vec<_>>(),
        "next_after": next, "has_more": next.is_some(),
    })))
}

#[derive(Deserialize)]
pub struct PageQuery {
    after: Option<u64>,
    limit: Option<u32>,
    /// `asc` (oldest first, paged with `after`: the default) or `desc` (newest first, paged
    /// with `before`).
    order: Option<String>,
    before: Option<u64>,
}

pub async fn account_transfers(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<Value>, AppError> {
    admin(&state, &headers).await?;
    statement(&state, parse_account_id(&id)?, q).await
}

/// A page of `account`'s transfers, oldest first, as both statement routes answer it.
async fn statement(state: &AppState, account: AccountId, q: PageQuery) -> Result<Json<Value>, AppError> {
    let b = billing(state)?;
    let limit = q.limit.unwrap_or(100);
    let newest_first = match q.order.as_deref() {
        None | Some("asc") => false,
        Some("desc") => true,
        Some(o) => return Err(AppError::invalid_value("order", format!("order must be asc or desc, got {o:?}"))),
    };
    let page = match (newest_first, q.after, q.before) {
        (false, after, None) => b.statement(account, after, limit).await?,
        (true, None, before) => b.statement_newest_first(account, before, limit).await?,
        (false, _, Some(_)) => return Err(AppError::invalid_value("before", "before pages a statement in order=desc; use after with order=asc")),
        (true, Some(_), _) => return Err(AppError::invalid_value("after", "after pages a statement in order=asc; use before with order=desc")),
    };
    let receipts = b.receipt_ids(&page.items.iter().map(|t| t.id).collect::<Vec<_>>()).await?;
    let data: Vec<Value> = page
        .items
        .iter()
        .zip(receipts)
        .map(|(t, r)| {
            let mut v = transfer_json(t);
            v["receipt_id"] = json!(r);
            v
        })
        .collect();
    let next = if newest_first { "next_before" } else { "next_after" };
    Ok(Json(json!({"object": "list", "data": data, next: page.next_cursor, "has_more": page.next_cursor.is_some()})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    #[serde(default = "default_scopes")]
    scopes: Vec<String>,
    rpm: Option<u32>,
    tpm: Option<u32>,
    spend_cap_day_micros: Option<i64>,
    spend_cap_month_micros: Option<i64>,
}

fn default_scopes() -> Vec<String> {
    vec![tokenomy_billing::SCOPE_INFERENCE.to_string()]
}

pub async fn create_key(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<NewKey>,
) -> Result<Response, AppError> {
    admin(&state, &headers).await?;
    let account = parse_account_id(&id)?;
    let caps = SpendCaps { day_micros: req.spend_cap_day_micros, month_micros: req.spend_cap_month_micros };
    let mut scopes = req.scopes;
    scopes.sort();
    scopes.dedup(); // (as the key is stored)
    let (key_id, key) = billing(&state)?.create_key(account, &scopes, req.rpm, req.tpm, caps).await?;
    let body = json!({
        "key_id": key_id.to_string(), "key": key, "account_id": account.to_string(), "scopes": scopes,
        "rpm": req.rpm, "tpm": req.tpm,
        "spend_cap_day_micros": caps.day_micros, "spend_cap_month_micros": caps.month_micros,
    });
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

pub async fn list_keys(State(state): State<AppState>, headers: HeaderMap, Path(id): Path<String>) -> Result<Json<Value>, AppError> {
    admin(&state, &headers).await?;
    let keys = billing(&state)?.list_keys(parse_account_id(&id)?).await?;
    Ok(Json(json!({"object": "list", "data": keys.iter().map(key_json).collect::<Vec<_>>()})))
}

/// `PUT /admin/v1/keys/{id}/limits`: all four limits, each omitted or null = no limit.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyLimits {
    rpm: Option<u32>,
    tpm: Option<u32>,
    spend_cap_day_micros: Option<i64>,
    spend_cap_month_micros: Option<i64>,
}

pub async fn set_key_limits(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<KeyLimits>,
) -> Result<Json<Value>, AppError> {
    admin(&state, &headers).await?;
    let caps = SpendCaps { day_micros: req.spend_cap_day_micros, month_micros: req.spend_cap_month_micros };
    let rec = billing(&state)?.set_key_limits(parse_key_id(&id)?, KeyLimitsChange::all(req.rpm, req.tpm, caps)).await?;
    Ok(Json(key_json(&rec)))
}

/// `PATCH /admin/v1/keys/{id}/limits`: changes only the limits named (a value sets one, `null`
/// removes it) and keeps the others, so raising an agent's rpm does not drop its budget.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyLimitsPatch {
    #[serde(default, deserialize_with = "named")]
    rpm: Option<Option<u32>>,
    #[serde(default, deserialize_with = "named")]
    tpm: Option<Option<u32>>,
    #[serde(default, deserialize_with = "named")]
    spend_cap_day_micros: Option<Option<i64>>,
    #[serde(default, deserialize_with = "named")]
    spend_cap_month_micros: Option<Option<i64>>,
}

/// A field given (`Some`), as a value or `null` (`Some(None)`); absent fields stay `None`.
fn named<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

pub async fn patch_key_limits(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<KeyLimitsPatch>,
) -> Result<Json<Value>, AppError> {
    admin(&state, &headers).await?;
    let change = KeyLimitsChange {
        rpm: req.rpm,
        tpm: req.tpm,
        day_micros: req.spend_cap_day_micros,
        month_micros: req.spend_cap_month_micros,
    };
    let rec = billing(&state)?.set_key_limits(parse_key_id(&id)?, change).await?;
    Ok(Json(key_json(&rec)))
}

/// `GET /admin/v1/keys/{id}`: one key (never its hash), revoked or not.
pub async fn get_key(State(state): State<AppState>, headers: HeaderMap, Path(id): Path<String>) -> Result<Json<Value>, AppError> {
    admin(&state, &headers).await?;
    Ok(Json(key_json(&billing(&state)?.key(parse_key_id(&id)?).await?)))
}

pub async fn revoke_key(State(state): State<AppState>, headers: HeaderMap, Path(id): Path<String>) -> Result<Json<Value>, AppError> {
    admin(&state, &headers).await?;
    let key = parse_key_id(&id)?;
    billing(&state)?.revoke_key(key).await?;
    Ok(Json(json!({"key_id": key.to_string(), "revoked": true})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mint {
    amount_micros: i64,
    idempotency_key: String,
}

pub async fn mint(State(state): State<AppState>, headers: HeaderMap, Path(id): Path<String>, ApiJson(req): ApiJson<Mint>) -> Result<Json<Value>, AppError> {
    let actor = admin(&state, &headers).await?;
    let b = billing(&state)?;
    let (t, r) = b.mint(parse_account_id(&id)?, req.amount_micros, &req.idempotency_key, &actor).await?;
    Ok(Json(json!({"transfer": transfer_json(&t), "receipt": receipt_json(&r)})))
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Refund {
    /// All that the receipt charged when absent; `null` is refused (a script's missing value
    /// must not refund everything).
    #[serde(default, deserialize_with = "named")]
    amount_micros: Option<Option<i64>>,
}

/// `POST /admin/v1/receipts/{id}/refund`: gives a usage charge back, once. The body may be
/// left out (a full refund).
pub async fn refund(State(state): State<AppState>, headers: HeaderMap, Path(id): Path<String>, body: bytes::Bytes) -> Result<Json<Value>, AppError> {
    let actor = admin(&state, &headers).await?;
    let req: Refund = match body.iter().all(u8::is_ascii_whitespace) {
        true => Refund::default(),
        false => serde_json::from_slice(&body).map_err(|e| AppError::invalid(format!("invalid body: {e}"), None))?,
    };
    let amount = match req.amount_micros {
        Some(None) => return Err(AppError::invalid_value("amount_micros", "amount_micros must be a number of micro-credits; leave it out to refund all")),
        Some(Some(n)) => Some(n),
        None => None,
    };
    let (t, r) = billing(&state)?.refund(&id, amount, &actor).await?;
    Ok(Json(json!({"transfer": transfer_json(&t), "receipt": receipt_json(&r)})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewTransfer {
    from: String,
    to: String,
    amount_micros: i64,
    idempotency_key: String,
}

pub async fn transfer(State(state): State<AppState>, headers: HeaderMap, ApiJson(req): ApiJson<NewTransfer>) -> Result<Json<Value>, AppError> {
    let actor = admin(&state, &headers).await?;
    let b = billing(&state)?;
    let (from, to) = (parse_account_id(&req.from)?, parse_account_id(&req.to)?);
    let (t, r) = b.transfer(from, to, req.amount_micros, &req.idempotency_key, &actor).await?;
    Ok(Json(json!({"transfer": transfer_json(&t), "receipt": receipt_json(&r)})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendCredits {
    to: String,
    amount_micros: i64,
    idempotency_key: Option<String>,
}

/// `POST /v1/transfers`: a key with the `transfer` scope sends its account's credits to
/// another customer account. Money moves once per `Idempotency-Key` (the header, or
/// `idempotency_key` in the body), which is therefore required: a client that timed out
/// retries with it and gets the same transfer and receipt back.
pub async fn send_credits(State(state): State<AppState>, headers: HeaderMap, ApiJson(req): ApiJson<SendCredits>) -> Result<Response, AppError> {
    let b = billing(&state)?;
    let p = principal(&state, &headers).await?;
    let key = match (idempotency_key(&headers)?, req.idempotency_key) {
        (Some(h), Some(k)) if h != k => return Err(AppError::invalid("The Idempotency-Key header and idempotency_key differ: send one.", Some("idempotency_key"))),
        (Some(k), _) => k,
        (None, Some(k)) if !k.is_empty() && k.len() <= IDEMPOTENCY_KEY_LEN_MAX_BYTES && k.bytes().all(|b| b.is_ascii_graphic()) => k,
        (None, Some(_)) => {
            let msg = format!("idempotency_key must be 1..={IDEMPOTENCY_KEY_LEN_MAX_BYTES} visible ASCII characters");
            return Err(AppError::invalid(msg, Some("idempotency_key")));
        }
        (None, None) => {
            let msg = "A transfer needs an Idempotency-Key (the header, or idempotency_key), so that a retry cannot send the credits twice.";
            return Err(AppError::invalid(msg, Some("idempotency_key")));
        }
    };
    let to = parse_account_id(&req.to).map_err(|_| AppError::invalid(format!("to: {:?} is not an account id.", req.to), Some("to")))?;
    let allowance = b.admit(&p).await?;
    let (t, r) = b.send(&p, to, req.amount_micros, &key).await?;
    let mut resp = Json(json!({"transfer": transfer_json(&t), "receipt": receipt_json(&r)})).into_response();
    ratelimit_headers(&mut resp, &allowance);
    Ok(resp)
}

pub async fn ledger_check(State(state): State<AppState>, headers: HeaderMap) -> Result<Json<Value>, AppError> {
    admin(&state, &headers).await?;
    let r = billing(&state)?.check().await?;
    Ok(Json(json!({
        "ok": r.ok, "accounts": r.accounts, "transfers": r.transfers,
        "sum_micros": i64::try_from(r.sum_micros).unwrap_or(i64::MAX), "problems": r.problems,
    })))
}

// ---------------------------------------------------------------------------------------------
// A key's own view, and the public log

pub async fn me(State(state): State<AppState>, headers: HeaderMap) -> Result<Json<Value>, AppError> {
    let b = billing(&state)?;
    let p = principal(&state, &headers).await?;
    let a = b.account(p.account).await?;
    let rate = b.allowance(&p).await?;
    Ok(Json(json!({
        "object": "me", "key_id": p.key_id.to_string(), "scopes": p.scopes,
        "limits": {
            "rpm": p.limits.rpm, "tpm": p.limits.tpm,
            "spend_cap_day_micros": p.caps.day_micros, "spend_cap_month_micros": p.caps.month_micros,
        },
        // What the key's RPM/TPM leave it now (on every node of a shared ledger); null fields
        // for a limit it does not have.
        "rate": {
            "remaining_requests": p.limits.rpm.map(|_| rate.remaining_requests),
            "reset_requests_ms": p.limits.rpm.map(|_| rate.reset_requests_ms),
            "remaining_tokens": p.limits.tpm.map(|_| rate.remaining_tokens),
            "reset_tokens_ms": p.limits.tpm.map(|_| rate.reset_tokens_ms),
        },
        "spend": spend_json(p.caps, p.spend),
        "account": account_json(&a),
        "usage": crate::usage::totals_json(b, p.account).await,
    })))
}

/// The key's own account statement (the admin route's shape, paged by `after` and `limit`):
/// its grants, holds and charges. A key sees no other account's.
pub async fn my_transfers(State(state): State<AppState>, headers: HeaderMap, ApiQuery(q): ApiQuery<PageQuery>) -> Result<Json<Value>, AppError> {
    let p = principal(&state, &headers).await?;
    statement(&state, p.account, q).await
}

pub async fn get_receipt(State(state): State<AppState>, headers: HeaderMap, Path(id): Path<String>) -> Result<Response, AppError> {
    let b = billing(&state)?;
    let p = principal(&state, &headers).await?;
    let body = b.receipt_bundle(&id, &p).await?;
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

pub async fn checkpoint(State(state): State<AppState>) -> Result<Response, AppError> {
    let signed = billing(&state)?.checkpoint().await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], signed.note).into_response())
}

#[derive(Deserialize)]
pub struct ConsistencyQuery {
    old: u64,
    new: u64,
}

pub async fn consistency(State(state): State<AppState>, ApiQuery(q): ApiQuery<ConsistencyQuery>) -> Result<Json<Value>, AppError> {
    use base64::Engine;
    let hashes = billing(&state)?.consistency(q.old, q.new).await?;
    let proof: Vec<String> = hashes.iter().map(|h| base64::engine::general_purpose::STANDARD.encode(h)).collect();
    Ok(Json(json!({"old": q.old, "new": q.new, "proof": proof})))
}

pub async fn node_key(State(state): State<AppState>) -> Result<Response, AppError> {
    let key = billing(&state)?.verifier().to_string();
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], format!("{key}\n")).into_response())
}

/// `GET /v1/node/keys`: the keys of every node of this node's ledger, one per line, this
/// node's first (each signs the receipts and checkpoints of the log name it carries; any node
/// of a shared ledger serves every node's receipts). A file `tokenomy verify --key` reads.
pub async fn node_keys(State(state): State<AppState>) -> Result<Response, AppError> {
    let keys = billing(&state)?.node_keys().await?;
    let text: String = keys.iter().map(|k| format!("{k}\n")).collect();
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_schemes_name_is_case_insensitive() {
        for (value, key) in [("Bearer tk-a", Some("tk-a")), ("bearer tk-a", Some("tk-a")), ("BEARER  tk-a ", Some("tk-a")), ("Basic dXNlcg==", None), ("Bearertk-a", None)] {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, value.parse().unwrap());
            assert_eq!(bearer(&h), key, "{value:?}");
        }
    }

    #[test]
    fn kept_answers_are_bounded_in_bytes_too() {
        let cache = IdempotencyCache::default();
        let account = AccountId(7);
        let body = bytes::Bytes::from(vec![b'x'; 1 << 20]); // (one buffer, shared by every entry)
        for i in 0..300 {
            let key = format!("k{i}");
            let Begin::Run(_) = cache.begin(account, &key, [0; 32]).unwrap() else { panic!("first run") };
            cache.finish(account, &key, [0; 32], StatusCode::OK, body.clone(), &HeaderMap::new());
        }
        let (count, bytes) = cache.kept();
        assert!(bytes <= IDEMPOTENT_RESPONSES_BYTES_MAX && count == IDEMPOTENT_RESPONSES_BYTES_MAX >> 20, "{count} answers, {bytes} bytes");
        // The newest is replayed, the oldest is gone (a retry of it runs again).
        assert!(matches!(cache.begin(account, "k299", [0; 32]), Ok(Begin::Replay(_))));
        assert!(matches!(cache.begin(account, "k0", [0; 32]), Ok(Begin::Run(_))));
    }
}
