//! Client commands: `verify` / `verify-log` (offline, no network) and the admin wrappers
//! `accounts`, `keys`, `credits`, `ledger` that call a running node's `/admin/v1` API.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use base64::Engine;
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use tokenomy_receipts::{verify_bundle, verify_consistency_notes, Hash, VerifierKey};

/// The key in `arg` (a key, or a file of keys one per line, as `GET /v1/node/keys` writes
/// the keys of every node of a ledger) that signs for the log named `name`: with one key,
/// that key (checks then say whose it is not); with several, the one of that name.
fn load_key(arg: &str, name: &str) -> Result<VerifierKey> {
    let text = if Path::new(arg).is_file() { std::fs::read_to_string(arg).with_context(|| format!("reading {arg}"))? } else { arg.to_string() };
    let keys = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(VerifierKey::parse).collect::<Result<Vec<_>, _>>();
    let mut keys = keys.map_err(|e| anyhow::anyhow!("verifier key: {e}"))?;
    match keys.iter().position(|k| k.name() == name) {
        // (No name: not a receipt or checkpoint at all, which the check then says.)
        _ if keys.len() == 1 || (name.is_empty() && !keys.is_empty()) => Ok(keys.remove(0)),
        Some(i) => Ok(keys.swap_remove(i)),
        None if keys.is_empty() => anyhow::bail!("verifier key: {arg} holds no key"),
        None => anyhow::bail!("none of the {} keys in {arg} is named {name:?}, the node that signed it", keys.len()),
    }
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// `tokenomy verify RECEIPT --key K`: signature, fields, inclusion proof and checkpoint.
pub fn verify(receipt: &Path, key: &str) -> Result<()> {
    let text = read(receipt)?;
    let json = serde_json::from_str::<Value>(&text).ok();
    // A saved error answer (the node refused to give the receipt) is not a receipt at all.
    if let Some(message) = json.as_ref().and_then(|v| v["error"]["message"].as_str().map(str::to_string)) {
        anyhow::bail!("{} holds an error answer, not a receipt: {message}", receipt.display());
    }
    let key = load_key(key, json.as_ref().and_then(|v| v["receipt"]["origin"].as_str()).unwrap_or_default())?;
    let v = verify_bundle(&text, &key).map_err(|e| anyhow::anyhow!("receipt does not verify: {e}"))?;
    let r = &v.receipt;
    out!("ok: receipt {} ({}) signed by {}", r.receipt_id, r.kind, key.name());
    out!("  account {}  amount {} micro-credits  transfer {}", r.account_id, r.amount_micros, r.transfer_id);
    if !r.model.is_empty() {
        out!("  model {}  prompt {}  cached {}  completion {}  reasoning {}", r.model, r.prompt_tokens, r.cached_tokens, r.completion_tokens, r.reasoning_tokens);
    }
    out!("  log index {} included in checkpoint of size {}", r.log_index, v.checkpoint.size);
    Ok(())
}

/// `tokenomy verify-log --key K OLD NEW PROOF`: the log grew append-only from OLD to NEW.
pub fn verify_log(key: &str, old: &Path, new: &Path, proof: &Path) -> Result<()> {
    let old_note = read(old)?;
    let key = load_key(key, old_note.lines().next().unwrap_or_default())?;
    let (hashes, sizes) = parse_proof(&read(proof)?).with_context(|| format!("{} is not a consistency proof", proof.display()))?;
    let (o, n) = verify_consistency_notes(&old_note, &read(new)?, &hashes, &key).map_err(|e| anyhow::anyhow!("log is not consistent: {e}"))?;
    if let Some((po, pn)) = sizes.filter(|&s| s != (o.size, n.size)) {
        anyhow::bail!("the proof says it is from size {po} to {pn}, but the checkpoints are of sizes {} and {}", o.size, n.size);
    }
    out!("ok: the log of {} grew append-only from size {} to {}", key.name(), o.size, n.size);
    Ok(())
}

/// The body of `GET /v1/log/consistency` (`{"old", "new", "proof": [base64…]}`: the hashes
/// and the sizes it names), or one base64 hash per line.
fn parse_proof(text: &str) -> Result<(Vec<Hash>, Option<(u64, u64)>)> {
    let (lines, sizes): (Vec<String>, _) = match serde_json::from_str::<Value>(text) {
        Ok(v) => {
            let proof = v["proof"].as_array().context("its JSON has no \"proof\" array")?;
            let sizes = v["old"].as_u64().zip(v["new"].as_u64());
            (proof.iter().map(|h| h.as_str().unwrap_or_default().to_string()).collect(), sizes)
        }
        Err(_) => (text.lines().filter(|l| !l.trim().is_empty()).map(str::to_string).collect(), None),
    };
    let hashes = lines
        .iter()
        .map(|l| {
            let b = base64::engine::general_purpose::STANDARD
                .decode(l.trim())
                .context("it is neither the JSON of GET /v1/log/consistency nor base64 hashes, one a line")?;
            <Hash>::try_from(b.as_slice()).map_err(|_| anyhow::anyhow!("a proof hash is not 32 bytes"))
        })
        .collect::<Result<_>>()?;
    Ok((hashes, sizes))
}

// ---------------------------------------------------------------------------------------------
// Admin wrappers

#[derive(Args, Clone)]
pub struct Conn {
    /// The node's address.
    #[arg(long, env = "TOKENOMY_URL", default_value = "http://127.0.0.1:8080", global = true)]
    url: String,
    /// Admin key (default: DATA_DIR/admin.key).
    #[arg(long, env = "TOKENOMY_ADMIN_KEY", global = true, hide_env_values = true)]
    admin_key: Option<String>,
    /// The node's data dir, to find admin.key.
    #[arg(long, env = "TOKENOMY_DATA_DIR", global = true)]
    data_dir: Option<PathBuf>,
    /// Print the node's JSON answer as is.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
pub enum Accounts {
    /// Create a user or agent account.
    Create {
        name: String,
        #[arg(long, default_value = "user")]
        kind: String,
    },
    /// Balance and pending holds of an account (its id, or its name if no other account has it).
    Show { id: String },
    /// Every account, oldest first (or the one with a name: names are unique).
    List {
        #[arg(long)]
        name: Option<String>,
    },
    /// The account's transfers, oldest first.
    Transfers {
        id: String,
        #[arg(long)]
        after: Option<u64>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

#[derive(Subcommand)]
pub enum Keys {
    /// Create a key for an account; the key is shown once.
    Create {
        account: String,
        /// inference, transfer or admin; several as `--scope inference,transfer` or repeated.
        #[arg(long = "scope", value_delimiter = ',', default_values_t = ["inference".to_string()])]
        scopes: Vec<String>,
        #[command(flatten)]
        limits: KeyLimits,
    },
    /// List an account's keys (hashes are never shown).
    List { account: String },
    /// Change a key's limits: those given are set, those named by --remove removed, the others
    /// kept; effective from its next request.
    Limits {
        key_id: String,
        #[command(flatten)]
        limits: KeyLimits,
        /// A limit to remove (repeatable).
        #[arg(long = "remove", value_enum)]
        remove: Vec<LimitName>,
    },
    /// Show one key: scopes, limits, spend (never its secret).
    Show { key_id: String },
    /// Revoke a key at once.
    Revoke { key_id: String },
}

/// A key's limit, by its admin API name.
#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq)]
pub enum LimitName {
    Rpm,
    Tpm,
    SpendCapDayMicros,
    SpendCapMonthMicros,
}

impl LimitName {
    fn field(self) -> &'static str {
        match self {
            LimitName::Rpm => "rpm",
            LimitName::Tpm => "tpm",
            LimitName::SpendCapDayMicros => "spend_cap_day_micros",
            LimitName::SpendCapMonthMicros => "spend_cap_month_micros",
        }
    }
}

/// A key's limits; each one not given means no limit.
#[derive(Args, Clone)]
pub struct KeyLimits {
    /// Requests per minute.
    #[arg(long)]
    rpm: Option<u32>,
    /// Tokens per minute.
    #[arg(long)]
    tpm: Option<u32>,
    /// Most the key may spend per UTC day (micro-credits; in-flight requests count).
    #[arg(long)]
    spend_cap_day_micros: Option<i64>,
    /// Most the key may spend per UTC calendar month (micro-credits).
    #[arg(long)]
    spend_cap_month_micros: Option<i64>,
}

impl KeyLimits {
    /// The admin API's fields for these limits.
    fn json(&self) -> serde_json::Map<String, Value> {
        let v = json!({
            "rpm": self.rpm, "tpm": self.tpm,
            "spend_cap_day_micros": self.spend_cap_day_micros, "spend_cap_month_micros": self.spend_cap_month_micros,
        });
        v.as_object().cloned().unwrap_or_default()
    }
}

#[derive(Subcommand)]
pub enum Credits {
    /// Mint credits from the treasury into an account.
    Mint {
        account: String,
        amount_micros: i64,
        /// Makes the mint safe to retry (default: a random one).
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// Move credits between accounts.
    Transfer {
        from: String,
        to: String,
        amount_micros: i64,
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// Give a usage charge back to the account that paid it (once per receipt; safe to retry).
    Refund {
        /// The charge's receipt id (`rcpt_…`).
        receipt: String,
        /// Part of the charge; all of it when absent.
        #[arg(long)]
        amount_micros: Option<i64>,
    },
}

#[derive(Subcommand)]
pub enum Ledger {
    /// Re-derive every ledger invariant from history.
    Check,
    /// What was charged for tokens, by UTC day: the whole ledger's, or one account's.
    Usage {
        /// An account (its id, or its name if no other account has it); all accounts when absent.
        #[arg(long)]
        account: Option<String>,
        /// Days back, today included.
        #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u32).range(1..=31))]
        days: u32,
        /// A line per model in each day.
        #[arg(long)]
        by_model: bool,
        /// A line per API key in each day (with --account).
        #[arg(long, requires = "account")]
        by_key: bool,
        /// A line per account in each day (without --account).
        #[arg(long, conflicts_with_all = ["account", "by_key"])]
        by_account: bool,
    },
}

fn idem(k: Option<String>) -> String {
    k.unwrap_or_else(|| format!("cli-{:032x}", rand_u128()))
}

fn rand_u128() -> u128 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    t ^ (u128::from(std::process::id()) << 64)
}

impl Conn {
    fn admin_key(&self) -> Result<String> {
        // (An empty `TOKENOMY_ADMIN_KEY=` is unset, not a key.)
        if let Some(k) = self.admin_key.as_deref().map(str::trim).filter(|k| !k.is_empty()) {
            return Ok(k.to_string());
        }
        let dir = self.data_dir.clone().unwrap_or_else(|| crate::models::home().join("data"));
        let p = dir.join("admin.key");
        Ok(read(&p).context("no admin key: pass --admin-key or --data-dir")?.trim().to_string())
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Result<Value> {
        // The node's address, also as the OpenAI base URL that `serve` prints (`…/v1`).
        let base = self.url.trim_end_matches('/');
        let url = format!("{}{path}", base.strip_suffix("/v1").unwrap_or(base));
        let mut req = reqwest::Client::new().request(method, &url).bearer_auth(self.admin_key()?);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.with_context(|| format!("calling {url}"))?;
        let status = resp.status();
        let v: Value = resp.json().await.with_context(|| format!("{url} answered {status} with a body that is not JSON"))?;
        if !status.is_success() {
            bail!("{status}: {}", v["error"]["message"].as_str().unwrap_or(&v.to_string()));
        }
        Ok(v)
    }

    /// Every account (or those named `name`), oldest first.
    async fn accounts(&self, name: Option<&str>) -> Result<Vec<Value>> {
        if let Some(n) = name {
            let mut u = reqwest::Url::parse("http://node/admin/v1/accounts").expect("a fixed URL");
            u.query_pairs_mut().append_pair("name", n);
            let page = self.call(reqwest::Method::GET, &format!("{}?{}", u.path(), u.query().unwrap_or_default()), None).await?;
            return Ok(page["data"].as_array().cloned().unwrap_or_default());
        }
        let (mut found, mut after) = (Vec::new(), String::new());
        loop {
            let page = self.call(reqwest::Method::GET, &format!("/admin/v1/accounts?limit=1000{after}"), None).await?;
            found.extend(page["data"].as_array().cloned().unwrap_or_default());
            match page["next_after"].as_str() {
                Some(next) => after = format!("&after={next}"),
                None => return Ok(found),
            }
        }
    }

    /// The id of the account `given` names: an account id (32 hex digits) as it is, or the
    /// name of exactly one account.
    async fn account_id(&self, given: &str) -> Result<String> {
        if given.len() == 32 && given.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(given.to_string());
        }
        let named = self.accounts(Some(given)).await?;
        match named.as_slice() {
            [one] => Ok(one["id"].as_str().unwrap_or_default().to_string()),
            [] => bail!("no account is named {given:?} (and it is not an account id: 32 hex digits); `tokenomy accounts list` shows them"),
            many => {
                let ids: Vec<&str> = many.iter().filter_map(|a| a["id"].as_str()).collect();
                bail!("{} accounts are named {given:?}: name one by its id ({})", many.len(), ids.join(", "))
            }
        }
    }

    fn show(&self, v: &Value) {
        if self.json {
            out!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
            return;
        }
        print_flat("", v);
    }
}

/// A usage page as a table: a line per day (and model), days without charges left out; the
/// charged column is net of refunds.
fn print_usage(page: &Value) {
    out!("{:<10}  {:<24} {:>8} {:>12} {:>10} {:>12} {:>16}  key / account", "day", "model", "requests", "prompt", "cached", "completion", "charged");
    for b in page["data"].as_array().into_iter().flatten() {
        let (y, m, d) = tokenomy_core::civil_from_days(b["start_time"].as_i64().unwrap_or(0) / 86_400);
        for r in b["results"].as_array().into_iter().flatten() {
            let n = |k: &str| r[k].as_u64().unwrap_or(0);
            // Net of refunds, which are rows of their own (no model) when grouped by model.
            let charged = credits_text(i128::from(n("charged_micros")) - i128::from(n("refunded_micros")));
            let model = r["model"].as_str().unwrap_or(if n("num_model_requests") == 0 { "(refunds)" } else { "(all)" });
            out!(
                "{y:04}-{m:02}-{d:02}  {model:<24} {:>8} {:>12} {:>10} {:>12} {charged:>16}  {}",
                n("num_model_requests"), n("input_tokens"), n("input_cached_tokens"), n("output_tokens"),
                r["api_key_id"].as_str().or(r["account_id"].as_str()).unwrap_or("")
            );
        }
    }
}

/// Micro-credits as credits with six decimals.
fn credits_text(micros: i128) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    format!("{sign}{}.{:06}", micros.abs() / 1_000_000, micros.abs() % 1_000_000)
}

fn print_flat(prefix: &str, v: &Value) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let p = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                print_flat(&p, x);
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                print_flat(&format!("{prefix}[{i}]"), x);
            }
        }
        Value::String(s) => out!("{prefix}: {s}"),
        other => out!("{prefix}: {other}"),
    }
}

pub async fn accounts(c: Conn, cmd: Accounts) -> Result<()> {
    use reqwest::Method;
    let v = match cmd {
        Accounts::Create { name, kind } => c.call(Method::POST, "/admin/v1/accounts", Some(json!({"name": name, "kind": kind}))).await?,
        Accounts::Show { id } => c.call(Method::GET, &format!("/admin/v1/accounts/{}", c.account_id(&id).await?), None).await?,
        Accounts::List { name } => json!({"object": "list", "data": c.accounts(name.as_deref()).await?}),
        Accounts::Transfers { id, after, limit } => {
            let id = c.account_id(&id).await?;
            let after = after.map(|a| format!("&after={a}")).unwrap_or_default();
            c.call(Method::GET, &format!("/admin/v1/accounts/{id}/transfers?limit={limit}{after}"), None).await?
        }
    };
    c.show(&v);
    Ok(())
}

pub async fn keys(c: Conn, cmd: Keys) -> Result<()> {
    use reqwest::Method;
    let v = match cmd {
        Keys::Create { account, scopes, limits } => {
            let account = c.account_id(&account).await?;
            let mut body = limits.json();
            body.insert("scopes".into(), json!(scopes));
            c.call(Method::POST, &format!("/admin/v1/accounts/{account}/keys"), Some(Value::Object(body))).await?
        }
        Keys::Limits { key_id, limits, remove } => {
            let mut body: serde_json::Map<String, Value> = limits.json().into_iter().filter(|(_, v)| !v.is_null()).collect();
            for r in remove {
                if body.insert(r.field().into(), Value::Null).is_some_and(|v| !v.is_null()) {
                    anyhow::bail!("{} is both given and removed", r.field());
                }
            }
            if body.is_empty() {
                anyhow::bail!("nothing to change: give a limit (--rpm, --tpm, --spend-cap-day-micros, --spend-cap-month-micros) or --remove one");
            }
            c.call(Method::PATCH, &format!("/admin/v1/keys/{key_id}/limits"), Some(Value::Object(body))).await?
        }
        Keys::Show { key_id } => c.call(Method::GET, &format!("/admin/v1/keys/{key_id}"), None).await?,
        Keys::List { account } => c.call(Method::GET, &format!("/admin/v1/accounts/{}/keys", c.account_id(&account).await?), None).await?,
        Keys::Revoke { key_id } => c.call(Method::DELETE, &format!("/admin/v1/keys/{key_id}"), None).await?,
    };
    c.show(&v);
    Ok(())
}

pub async fn credits(c: Conn, cmd: Credits) -> Result<()> {
    use reqwest::Method;
    let v = match cmd {
        Credits::Mint { account, amount_micros, idempotency_key } => {
            let account = c.account_id(&account).await?;
            let body = json!({"amount_micros": amount_micros, "idempotency_key": idem(idempotency_key)});
            c.call(Method::POST, &format!("/admin/v1/accounts/{account}/mint"), Some(body)).await?
        }
        Credits::Transfer { from, to, amount_micros, idempotency_key } => {
            let (from, to) = (c.account_id(&from).await?, c.account_id(&to).await?);
            let body = json!({"from": from, "to": to, "amount_micros": amount_micros, "idempotency_key": idem(idempotency_key)});
            c.call(Method::POST, "/admin/v1/transfers", Some(body)).await?
        }
        Credits::Refund { receipt, amount_micros } => {
            let body = amount_micros.map_or_else(|| json!({}), |n| json!({"amount_micros": n}));
            c.call(Method::POST, &format!("/admin/v1/receipts/{receipt}/refund"), Some(body)).await?
        }
    };
    c.show(&v);
    Ok(())
}

pub async fn ledger(c: Conn, cmd: Ledger) -> Result<()> {
    match cmd {
        Ledger::Check => {
            let v = c.call(reqwest::Method::GET, "/admin/v1/ledger/check", None).await?;
            c.show(&v);
            if v["ok"] != json!(true) {
                bail!("the ledger check failed");
            }
            Ok(())
        }
        Ledger::Usage { account, days, by_model, by_key, by_account } => usage(&c, account, days, [by_model, by_key, by_account]).await,
    }
}

/// `tokenomy ledger usage`: the last `days` UTC days of the ledger's usage (or one account's),
/// as a table or as the API's JSON.
/// `by`: a line per model, per key, per account.
async fn usage(c: &Conn, account: Option<String>, days: u32, by: [bool; 3]) -> Result<()> {
    let now_s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
    let start_s = (now_s / 86_400).saturating_sub(u64::from(days) - 1) * 86_400;
    let mut uri = format!("/admin/v1/usage?start_time={start_s}&limit={days}");
    if let Some(a) = account {
        uri.push_str(&format!("&account_id={}", c.account_id(&a).await?));
    }
    let group: Vec<&str> = by.into_iter().zip(["model", "api_key_id", "account_id"]).filter_map(|(on, g)| on.then_some(g)).collect();
    if !group.is_empty() {
        uri.push_str(&format!("&group_by={}", group.join(",")));
    }
    let v = c.call(reqwest::Method::GET, &uri, None).await?;
    if c.json {
        c.show(&v);
    } else {
        print_usage(&v);
    }
    Ok(())
}
