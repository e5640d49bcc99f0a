//! Usage reports: `GET /v1/me/usage` (the key's account) and `GET /admin/v1/usage` (the whole
//! ledger, or one account), in the shape of OpenAI's completions usage API (`object: page` of
//! daily `bucket`s whose `results` count `input_tokens`, `output_tokens`,
//! `input_cached_tokens` and `num_model_requests`, grouped by model, API key and/or account,
//! for all models or some), with what the tokens were charged here and would have cost at the
//! reference list price. `/v1/me`'s `usage` is their all-time sum.
//!
//! The figures are the ledger's receipts (`tokenomy_billing::usage`): every node's charges,
//! surviving restarts. A free model's requests are not charged and so not in them.

use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use tokenomy_billing::usage::{BucketKey, UsageTotals, DAY_MS};
use tokenomy_ledger::AccountId;

use crate::charge::{admin, billing, principal};
use crate::error::AppError;
use crate::AppState;

const DAY_S: u64 = DAY_MS / 1000;
/// Daily buckets per page: OpenAI's default and maximum for `bucket_width=1d`.
pub const BUCKETS_DEFAULT: u32 = 7;
pub const BUCKETS_MAX: u32 = 31;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageQuery {
    /// Unix seconds; the report starts at the UTC day holding it (default: six days before the
    /// day of `end_time`). Usage is kept by day: a time within a day stands for the whole day.
    start_time: Option<u64>,
    /// Unix seconds, exclusive; the report ends with the UTC day holding the second before it
    /// (default: now).
    end_time: Option<u64>,
    /// Only `1d`.
    bucket_width: Option<String>,
    /// `model`, `api_key_id`, `account_id`, comma-separated: a result per model, key and/or
    /// account in each bucket (default: one result per bucket). OpenAI's array form,
    /// `group_by[]=model`, too.
    #[serde(alias = "group_by[]")]
    group_by: Option<String>,
    /// Only these models, comma-separated (refunds, which name no model, are left out).
    #[serde(alias = "models[]")]
    models: Option<String>,
    /// Buckets per page, 1 to [`BUCKETS_MAX`].
    limit: Option<u32>,
    /// The `next_page` of the previous page.
    page: Option<String>,
    /// Admin route only: one account's usage instead of the ledger's.
    account_id: Option<String>,
}

/// The query string with each list parameter (`models`, `group_by`) once, its values joined
/// with commas: OpenAI's array form names it once per value (`models[]=a&models[]=b`), and
/// repeating a parameter is how a query string lists values anyway. Names are compared
/// decoded (`models%5B%5D` is `models[]`), as the query's deserializer reads them.
fn join_lists(query: &str) -> String {
    let mut pairs: Vec<(String, String)> = Vec::new();
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        let list = match name.as_ref() {
            "models" | "models[]" => "models",
            "group_by" | "group_by[]" => "group_by",
            _ => {
                pairs.push((name.into_owned(), value.into_owned()));
                continue;
            }
        };
        match pairs.iter_mut().find(|(n, _)| n == list) {
            Some((_, joined)) => {
                joined.push(',');
                joined.push_str(&value);
            }
            None => pairs.push((list.to_string(), value.into_owned())),
        }
    }
    form_urlencoded::Serializer::new(String::new()).extend_pairs(pairs).finish()
}

fn usage_query(raw: Option<String>) -> Result<UsageQuery, AppError> {
    crate::routes::api_query(&join_lists(raw.as_deref().unwrap_or("")))
}

/// `GET /v1/me/usage`: the key's account's usage by UTC day.
pub async fn mine(State(state): State<AppState>, headers: HeaderMap, RawQuery(raw): RawQuery) -> Result<Json<Value>, AppError> {
    let p = principal(&state, &headers).await?;
    let q = usage_query(raw)?;
    if q.account_id.is_some() {
        return Err(AppError::invalid_value("account_id", "account_id is for the admin route, /admin/v1/usage; this one reports the key's own account"));
    }
    page(&state, Some(p.account), q).await
}

/// `GET /admin/v1/usage`: the ledger's usage by UTC day, or one account's (`account_id`).
pub async fn ledger(State(state): State<AppState>, headers: HeaderMap, RawQuery(raw): RawQuery) -> Result<Json<Value>, AppError> {
    admin(&state, &headers).await?;
    let q = usage_query(raw)?;
    let account = match q.account_id.as_deref() {
        None => None,
        Some(id) => Some(tokenomy_billing::parse_account_id(id).map_err(|e| AppError { param: Some("account_id".into()), ..AppError::from(e) })?),
    };
    if let Some(a) = account {
        // An unknown account is a 404, not an empty report.
        billing(&state)?.account(a).await.map_err(|e| AppError { param: Some("account_id".into()), ..AppError::from(e) })?;
    }
    page(&state, account, q).await
}

/// The days a query asks for: `(first, last)` UTC day numbers, inclusive, at most `limit`.
fn days(q: &UsageQuery, now_s: u64) -> Result<(u32, u32, u32), AppError> {
    if let Some(w) = q.bucket_width.as_deref().filter(|w| *w != "1d") {
        return Err(AppError::invalid_value("bucket_width", format!("bucket_width must be 1d (usage is kept by UTC day), got {w:?}")));
    }
    let limit = q.limit.unwrap_or(BUCKETS_DEFAULT);
    if !(1..=BUCKETS_MAX).contains(&limit) {
        return Err(AppError::invalid_value("limit", format!("limit must be 1 to {BUCKETS_MAX} daily buckets, got {limit}")));
    }
    let end_s = q.end_time.unwrap_or(now_s);
    let (start_s, start_param) = match (&q.page, q.start_time) {
        (Some(p), _) => (p.parse::<u64>().map_err(|_| AppError::invalid_value("page", format!("page must be a next_page this route returned, got {p:?}")))?, "page"),
        (None, Some(s)) => (s, "start_time"),
        (None, None) => ((end_s.saturating_sub(1) / DAY_S).saturating_sub(6) * DAY_S, "end_time"),
    };
    if end_s <= start_s {
        let (param, message) = match q.end_time {
            None => (start_param, format!("{start_param} ({start_s}) must be before end_time (now: {end_s})")),
            Some(_) => ("end_time", format!("end_time ({end_s}) must be after {start_param} ({start_s})")),
        };
        return Err(AppError::invalid_value(param, message));
    }
    let day = |s: u64, param: &str| u32::try_from(s / DAY_S).map_err(|_| AppError::invalid_value(param, format!("{param} is Unix seconds, got {s}")));
    let (first, last) = (day(start_s, start_param)?, day(end_s - 1, "end_time")?);
    Ok((first, last.min(first.saturating_add(limit - 1)), last))
}

/// What a result row is per: `group_by` as `model`, `api_key_id`, `account_id` (comma-separated).
#[derive(Debug, Default, PartialEq, Eq)]
struct Grouping {
    model: bool,
    key: bool,
    account: bool,
}

fn grouping(g: Option<&str>, account: Option<AccountId>) -> Result<Grouping, AppError> {
    let mut out = Grouping::default();
    let Some(g) = g else { return Ok(out) };
    let parts: Vec<&str> = g.split(',').map(str::trim).filter(|p| !p.is_empty()).collect();
    if parts.is_empty() {
        return Err(AppError::invalid_value("group_by", "group_by names model, api_key_id or account_id (any of them, comma-separated); leave it out for one row a day"));
    }
    for part in parts {
        match part {
            "model" => out.model = true,
            "api_key_id" => out.key = true,
            "account_id" => out.account = true,
            other => {
                let message = format!("group_by is model, api_key_id or account_id (any of them, comma-separated), got {other:?}");
                return Err(AppError::invalid_value("group_by", message));
            }
        }
    }
    if out.key && account.is_none() {
        return Err(AppError::invalid_value("group_by", "group_by=api_key_id reports one account's keys: add account_id"));
    }
    Ok(out)
}

/// The `models` filter: `None` for every model (and refunds).
fn models(m: Option<&str>) -> Result<Option<std::collections::BTreeSet<&str>>, AppError> {
    let Some(m) = m else { return Ok(None) };
    let set: std::collections::BTreeSet<&str> = m.split(',').map(str::trim).filter(|p| !p.is_empty()).collect();
    if set.is_empty() {
        return Err(AppError::invalid_value("models", "models names one or more models, comma-separated"));
    }
    Ok(Some(set))
}

/// A result row's grouping: model, key and account, each `None` where not grouped by it.
type RowKey<'a> = (Option<&'a str>, Option<&'a str>, Option<String>);

async fn page(state: &AppState, account: Option<AccountId>, q: UsageQuery) -> Result<Json<Value>, AppError> {
    let b = billing(state)?;
    let now_s = u64::try_from(tokenomy_ledger::now_ms()).unwrap_or(0) / 1000;
    let (first, last, end) = days(&q, now_s)?;
    let by = grouping(q.group_by.as_deref(), account)?;
    let only = models(q.models.as_deref())?;
    let reference = b.config().reference.is_some();
    let buckets: Vec<(Option<AccountId>, BucketKey, UsageTotals)> = match account {
        None if by.account => b.usage_by_account(first..=last).await?.into_iter().map(|(a, k, t)| (Some(a), k, t)).collect(),
        _ => b.usage(account, first..=last).await?.into_iter().map(|(k, t)| (account, k, t)).collect(),
    };
    let kept = |model: &str| only.as_ref().is_none_or(|set| set.contains(model));
    let data: Vec<Value> = (first..=last)
        .map(|day| {
            // Rows of the day as grouped; "" (a refund's model and key) reads as null.
            let mut rows: std::collections::BTreeMap<RowKey, UsageTotals> = Default::default();
            for (acc, (_, model, key), t) in buckets.iter().filter(|(_, (d, m, _), _)| *d == day && kept(m)) {
                let acc = acc.filter(|_| by.account).map(|a| a.to_string());
                rows.entry((named(by.model, model), named(by.key, key), acc)).or_default().add(t);
            }
            let results: Vec<Value> = rows.iter().map(|((model, key, acc), t)| result(t, *model, *key, acc.as_deref(), reference)).collect();
            let start = u64::from(day) * DAY_S;
            json!({"object": "bucket", "start_time": start, "end_time": start + DAY_S, "results": results})
        })
        .collect();
    let more = last < end;
    let next = more.then(|| (u64::from(last) + 1) * DAY_S);
    Ok(Json(json!({"object": "page", "data": data, "has_more": more, "next_page": next.map(|n| n.to_string())})))
}

/// `v` when its row is grouped by it and it has one ("" is none: a refund's).
fn named(on: bool, v: &str) -> Option<&str> {
    (on && !v.is_empty()).then_some(v)
}

/// One result row: OpenAI's fields, then what the tokens cost here and at the reference price.
fn result(t: &UsageTotals, model: Option<&str>, api_key_id: Option<&str>, account_id: Option<&str>, with_reference: bool) -> Value {
    json!({
        "object": "organization.usage.completions.result",
        "input_tokens": t.prompt_tokens, "output_tokens": t.completion_tokens,
        "input_cached_tokens": t.cached_tokens, "num_model_requests": t.requests,
        "input_audio_tokens": 0, "output_audio_tokens": 0,
        "project_id": null, "user_id": null, "api_key_id": api_key_id, "batch": null,
        "model": model, "account_id": account_id, "reasoning_tokens": t.reasoning_tokens,
        "charged_micros": t.charged_micros, "refunded_micros": t.refunded_micros,
        "reference_cost_micros": with_reference.then_some(t.reference_micros),
    })
}

/// `/v1/me`'s `usage`: everything the account was charged for, since its first charge; `null`
/// when the receipts log cannot be read now (a halted node still shows the balance).
pub async fn totals_json(b: &tokenomy_billing::Billing, account: AccountId) -> Value {
    let (t, first_day) = match b.usage_totals(Some(account)).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "/v1/me without usage: the receipts log could not be read");
            return Value::Null;
        }
    };
    let net = i64::try_from(t.charged_micros.saturating_sub(t.refunded_micros)).unwrap_or(i64::MAX);
    let reference = b.config().reference.as_ref().map(|r| {
        let cost = i64::try_from(t.reference_micros).unwrap_or(i64::MAX);
        json!({"name": r.name, "cost_micros": cost, "saved_micros": cost.saturating_sub(net)})
    });
    json!({
        "since": first_day.map(|d| u64::from(d) * DAY_S),
        "requests": t.requests, "prompt_tokens": t.prompt_tokens, "cached_tokens": t.cached_tokens,
        "completion_tokens": t.completion_tokens, "reasoning_tokens": t.reasoning_tokens,
        "charged_micros": t.charged_micros, "refunded_micros": t.refunded_micros, "reference": reference,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(s: &str) -> UsageQuery {
        usage_query(Some(s.to_string())).unwrap()
    }

    #[test]
    fn list_parameters_may_be_repeated() {
        assert_eq!(join_lists("models[]=a&limit=2&models[]=b&group_by%5B%5D=model&group_by=account_id"), "models=a%2Cb&limit=2&group_by=model%2Caccount_id");
        assert_eq!(query("models=a&models=b%20c").models.as_deref(), Some("a,b c"));
        // Names compared decoded, however encoded; compared as given (no case folding).
        assert_eq!(query("models%5B]=a&%6Dodels[%5D=b+c&models=d%2Ce").models.as_deref(), Some("a,b c,d,e"));
        assert_eq!(usage_query(Some("MODELS=a".into())).unwrap_err().param.as_deref(), Some("MODELS"));
        assert_eq!(query("group_by[]=model&group_by[]=api_key_id").group_by.as_deref(), Some("model,api_key_id"));
        assert_eq!(join_lists("limit&&start_time=5"), "limit=&start_time=5");
        assert_eq!(join_lists("models=%26%3D"), "models=%26%3D", "values stay what they were");
        assert_eq!(usage_query(Some("limit=2&limit=3".into())).unwrap_err().message, "The query string is not valid for this endpoint: Failed to deserialize query string: duplicate field `limit`");
    }

    #[test]
    fn a_query_names_whole_utc_days_and_pages_by_limit() {
        let now = 20_000 * DAY_S + 3_600;
        assert_eq!(days(&query(""), now).unwrap(), (19_994, 20_000, 20_000), "the last 7 days by default");
        let q = format!("end_time={}", 19_990 * DAY_S);
        assert_eq!(days(&query(&q), now).unwrap(), (19_983, 19_989, 19_989), "the 7 days before end_time");
        assert_eq!(query("group_by[]=model").group_by.as_deref(), Some("model"), "OpenAI's array form");
        let q = format!("start_time={}&end_time={}&limit=2", 19_990 * DAY_S + 5, 19_995 * DAY_S);
        assert_eq!(days(&query(&q), now).unwrap(), (19_990, 19_991, 19_994), "end_time is exclusive");
        let q = format!("page={}&end_time={}&limit=2", 19_994 * DAY_S, 19_995 * DAY_S);
        assert_eq!(days(&query(&q), now).unwrap(), (19_994, 19_994, 19_994));
        let future = format!("start_time={}", now + DAY_S);
        for (q, param) in [
            ("bucket_width=1h", "bucket_width"),
            ("limit=0", "limit"),
            ("limit=32", "limit"),
            ("page=tomorrow", "page"),
            ("start_time=100&end_time=100", "end_time"),
            (future.as_str(), "start_time"),
            ("start_time=18446744073709551615", "start_time"),
            ("end_time=18446744073709551615", "end_time"),
        ] {
            let e = days(&query(q), now).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{q}: {e:?}");
        }
    }

    #[test]
    fn results_group_by_model_key_and_account_and_filter_models() {
        let a = Some(AccountId(7));
        assert_eq!(grouping(None, a).unwrap(), Grouping::default());
        assert_eq!(grouping(Some("model"), None).unwrap(), Grouping { model: true, ..Default::default() });
        assert_eq!(grouping(Some("api_key_id, model"), a).unwrap(), Grouping { model: true, key: true, account: false });
        assert_eq!(grouping(Some("account_id,model"), None).unwrap(), Grouping { model: true, key: false, account: true });
        assert_eq!(models(Some("a, b,")).unwrap(), Some(["a", "b"].into_iter().collect()));
        assert_eq!(models(None).unwrap(), None);
        assert_eq!(models(Some(" , ")).unwrap_err().param.as_deref(), Some("models"));
        for (g, account) in [(Some("project_id"), a), (Some("api_key_id"), None), (Some(""), a), (Some(" , "), None)] {
            assert_eq!(grouping(g, account).unwrap_err().param.as_deref(), Some("group_by"), "{g:?}");
        }
    }
}
