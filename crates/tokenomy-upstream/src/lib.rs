//! Remote OpenAI-compatible providers as sources of tokens beside the local engine.
//!
//! # Why the crate is shaped this way
//!
//! A node sells tokens it produces and tokens it buys: another tokenomy node, a pool of
//! llama.cpp or vLLM servers, a cloud API. Whatever produced them, the node meters, charges and
//! proves them the same way, so this crate only *fetches*: it knows the OpenAI wire format and
//! the network, and nothing of accounts, prices or receipts (the HTTP crate holds the request's
//! hold and settles it on the usage an upstream reports).
//!
//! * **One module per provider kind, a closed enum to dispatch** ([`Provider`]), as TensorZero
//!   does: adding Anthropic's or Bedrock's wire format is one module and one variant, and every
//!   kind answers the same conformance suite (`tests/it`).
//! * **Requests stay JSON.** A proxied request is forwarded as the client wrote it (fields this
//!   node does not model included), with only the model renamed and, for a stream, usage asked
//!   for, so an upstream's features reach the client unchanged.
//! * **Routing is data** ([`Upstreams::routes`]): the candidates for a model in the order they
//!   are tried, by the configured policy (cheapest first, or fastest first by measured time to
//!   first byte); a candidate that fails before answering (refused connection, timeout, 429,
//!   5xx) gives way to the next.
//! * **Bounded:** every request has a connect and a total timeout, and a stream is read a
//!   chunk at a time.
pub mod openai;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use thiserror::Error;

pub use openai::{ChunkStream, OpenAi};

/// What an upstream did wrong, or could not be reached for.
#[derive(Debug, Clone, Error)]
pub enum UpstreamError {
    #[error("could not reach upstream {upstream}: {detail}")]
    Connect { upstream: String, detail: String },
    #[error("upstream {upstream} did not answer in time")]
    Timeout { upstream: String },
    /// An HTTP error status, with the upstream's (OpenAI-shaped, if it is one) body.
    #[error("upstream {upstream} answered {status}: {message}")]
    Status { upstream: String, status: u16, message: String, body: Option<Value> },
    #[error("upstream {upstream} broke the protocol: {detail}")]
    Protocol { upstream: String, detail: String },
}

/// Whether an upstream's HTTP status refuses the request itself (the client's fault, which
/// another upstream would refuse too), rather than the node's use of that upstream: a 401 or
/// 403 (its key), a 402 (its credit there), a 404 (a model it does not have), a 429 and a 5xx
/// are the upstream's or the operator's problem, and another upstream may serve the request.
pub fn is_request_fault(status: u16) -> bool {
    matches!(status, 400 | 413 | 422)
}

impl UpstreamError {
    /// Whether another upstream may be tried: anything but a refusal of the request itself.
    pub fn retryable(&self) -> bool {
        match self {
            UpstreamError::Status { status, .. } => !is_request_fault(*status),
            _ => true,
        }
    }
}

/// Token counts as an upstream reported them (OpenAI's `usage`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UpstreamUsage {
    pub prompt_tokens: u32,
    pub cached_tokens: u32,
    pub completion_tokens: u32,
    pub reasoning_tokens: u32,
}

/// The `usage` of a chat completion or of a stream's last chunk, if it has one.
pub fn usage_of(v: &Value) -> Option<UpstreamUsage> {
    let u = v.get("usage")?.as_object()?;
    let count = |v: Option<&Value>| v.and_then(Value::as_u64).map(|n| u32::try_from(n).unwrap_or(u32::MAX));
    Some(UpstreamUsage {
        prompt_tokens: count(u.get("prompt_tokens"))?,
        completion_tokens: count(u.get("completion_tokens"))?,
        cached_tokens: count(u.get("prompt_tokens_details").and_then(|d| d.get("cached_tokens"))).unwrap_or(0),
        reasoning_tokens: count(u.get("completion_tokens_details").and_then(|d| d.get("reasoning_tokens"))).unwrap_or(0),
    })
}

/// The `usage` of an embeddings answer (prompt tokens only), if it has one.
pub fn embedding_usage_of(v: &Value) -> Option<UpstreamUsage> {
    let prompt_tokens = v.get("usage")?.get("prompt_tokens")?.as_u64()?;
    Some(UpstreamUsage { prompt_tokens: u32::try_from(prompt_tokens).unwrap_or(u32::MAX), ..UpstreamUsage::default() })
}

// ---------------------------------------------------------------------------------------------
// Configuration

/// `--upstreams FILE`: a TOML list of `[[upstream]]` tables.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamsConfig {
    /// How candidates for one model are ordered.
    #[serde(default)]
    pub policy: Policy,
    #[serde(default)]
    pub upstream: Vec<UpstreamConfig>,
}

/// The order in which the upstreams serving one model are tried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// The lowest `cost_micros_per_mtok` first (unknown cost last), then the configured order.
    #[default]
    Cheapest,
    /// The lowest measured time to first byte first (untried ones first, so each is measured).
    Fastest,
    /// The configured order.
    Ordered,
}

/// One upstream.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// A short name: shown in `/v1/models` (`owned_by`), logs, metrics and the
    /// `tokenomy-upstream` response header.
    pub name: String,
    /// The wire format; only `openai` (OpenAI-compatible: OpenAI, tokenomy, llama.cpp,
    /// vLLM, …) so far.
    #[serde(default = "default_kind")]
    pub kind: String,
    /// The API's base URL, `/v1` included: `http://10.0.0.2:8080/v1`.
    pub base_url: String,
    /// The bearer key, inline …
    pub api_key: Option<String>,
    /// … or the name of the environment variable that holds it (preferred).
    pub api_key_env: Option<String>,
    /// Models served through this upstream: the name clients use → the upstream's name.
    /// Absent: every model the upstream's `GET /models` lists, under its own name.
    pub models: Option<BTreeMap<String, String>>,
    /// What the upstream charges per million tokens (input and output averaged), for the
    /// `cheapest` policy; not what clients pay (that is the node's price list).
    pub cost_micros_per_mtok: Option<u64>,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
}

fn default_kind() -> String {
    "openai".into()
}
fn default_timeout_ms() -> u64 {
    600_000
}
fn default_connect_timeout_ms() -> u64 {
    10_000
}

impl UpstreamsConfig {
    pub fn parse(text: &str) -> Result<UpstreamsConfig, String> {
        let c: UpstreamsConfig = toml::from_str(text).map_err(|e| format!("upstreams file: {e}"))?;
        for u in &c.upstream {
            u.validate()?;
        }
        c.check_names()?;
        Ok(c)
    }

    /// Each upstream's name is its own (the file's and the command line's together): metrics,
    /// the `tokenomy-upstream` header and the logs name upstreams by it.
    pub fn check_names(&self) -> Result<(), String> {
        let mut names = std::collections::BTreeSet::new();
        for u in &self.upstream {
            if !names.insert(u.name.as_str()) {
                return Err(format!("upstream {:?} is named twice", u.name));
            }
        }
        Ok(())
    }

    /// The quick form of the command line, `NAME=URL`: every model the upstream lists, its
    /// key from `TOKENOMY_UPSTREAM_<NAME>_KEY` if set.
    pub fn quick(spec: &str) -> Result<UpstreamConfig, String> {
        let (name, url) = spec.split_once('=').ok_or_else(|| format!("--upstream {spec}: expected NAME=URL"))?;
        let env = format!("TOKENOMY_UPSTREAM_{}_KEY", name.to_ascii_uppercase().replace(['-', '.'], "_"));
        let c = UpstreamConfig {
            name: name.into(),
            kind: default_kind(),
            base_url: url.into(),
            api_key: None,
            api_key_env: Some(env),
            models: None,
            cost_micros_per_mtok: None,
            timeout_ms: default_timeout_ms(),
            connect_timeout_ms: default_connect_timeout_ms(),
        };
        c.validate()?;
        Ok(c)
    }
}

impl UpstreamConfig {
    fn validate(&self) -> Result<(), String> {
        let u = self;
        if u.name.is_empty() || !u.name.chars().all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch)) {
            return Err(format!("upstream name {:?}: use letters, digits, '-', '_' or '.'", u.name));
        }
        if u.kind != "openai" {
            return Err(format!("upstream {}: kind {:?} is not supported (only \"openai\")", u.name, u.kind));
        }
        if !(u.base_url.starts_with("http://") || u.base_url.starts_with("https://")) {
            return Err(format!("upstream {}: base_url must be an http:// or https:// URL", u.name));
        }
        match reqwest::Url::parse(&u.base_url) {
            Ok(url) if url.host_str().is_some_and(|h| !h.is_empty()) => {}
            Ok(_) => return Err(format!("upstream {}: base_url {:?} names no host", u.name, u.base_url)),
            Err(e) => return Err(format!("upstream {}: base_url {:?} is not a URL ({e})", u.name, u.base_url)),
        }
        if u.api_key.is_some() && u.api_key_env.is_some() {
            return Err(format!("upstream {}: give api_key or api_key_env, not both", u.name));
        }
        if u.timeout_ms == 0 || u.connect_timeout_ms == 0 {
            return Err(format!("upstream {}: timeouts must be positive", u.name));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Providers

/// Every provider kind (closed: dispatch is a `match`).
#[derive(Debug)]
pub enum Provider {
    OpenAi(OpenAi),
}

impl Provider {
    pub fn name(&self) -> &str {
        match self {
            Provider::OpenAi(p) => p.name(),
        }
    }

    /// A whole chat completion.
    pub async fn chat(&self, body: &Value) -> Result<Value, UpstreamError> {
        match self {
            Provider::OpenAi(p) => p.chat(body).await,
        }
    }

    /// A text completion (OpenAI's legacy `/completions`): the whole answer.
    pub async fn completion(&self, body: &Value) -> Result<Value, UpstreamError> {
        match self {
            Provider::OpenAi(p) => p.completion(body).await,
        }
    }

    /// A streamed text completion: its chunks, once the upstream has accepted the request.
    pub async fn completion_stream(&self, body: &Value) -> Result<ChunkStream, UpstreamError> {
        match self {
            Provider::OpenAi(p) => p.completion_stream(body).await,
        }
    }

    /// Embeddings (OpenAI's `/embeddings`): the whole answer.
    pub async fn embeddings(&self, body: &Value) -> Result<Value, UpstreamError> {
        match self {
            Provider::OpenAi(p) => p.embeddings(body).await,
        }
    }

    /// A streamed chat completion: its chunks, once the upstream has accepted the request.
    pub async fn chat_stream(&self, body: &Value) -> Result<ChunkStream, UpstreamError> {
        match self {
            Provider::OpenAi(p) => p.chat_stream(body).await,
        }
    }

    /// The upstream's model ids.
    pub async fn models(&self) -> Result<Vec<String>, UpstreamError> {
        match self {
            Provider::OpenAi(p) => p.models().await,
        }
    }
}

/// One upstream and what this node has measured of it.
#[derive(Debug)]
pub struct Upstream {
    pub provider: Provider,
    pub cost_micros_per_mtok: Option<u64>,
    /// The configured `models`, or `None` to serve whatever the upstream lists.
    configured: Option<BTreeMap<String, String>>,
    /// Smoothed time to first byte (ms); 0 until measured.
    ttfb_ms_ewma: AtomicU64,
    /// Failures in a row, and until when (ms since the Unix epoch) the upstream is tried only
    /// after the others: 15 s after one failure, doubling to a minute.
    failures_in_a_row: AtomicU64,
    cooling_until_ms: AtomicU64,
    pub requests: AtomicU64,
    pub failures: AtomicU64,
}

impl Upstream {
    pub fn name(&self) -> &str {
        self.provider.name()
    }

    /// Records a time to first byte (an exponentially weighted mean, weight 1/4).
    pub fn observe_ttfb(&self, ms: u64) {
        let old = self.ttfb_ms_ewma.load(Relaxed);
        let new = if old == 0 { ms.max(1) } else { (old * 3 + ms.max(1)) / 4 };
        self.ttfb_ms_ewma.store(new, Relaxed);
    }

    pub fn ttfb_ms(&self) -> u64 {
        self.ttfb_ms_ewma.load(Relaxed)
    }

    /// A failure of this upstream (not of the request): it goes last for a while.
    pub fn record_failure(&self) {
        let n = self.failures_in_a_row.fetch_add(1, Relaxed) + 1;
        let pause_ms = (15_000u64 << (n - 1).min(2)).min(COOLING_MS_MAX);
        self.cooling_until_ms.store(now_ms() + pause_ms, Relaxed);
    }

    pub fn record_success(&self) {
        self.failures_in_a_row.store(0, Relaxed);
        self.cooling_until_ms.store(0, Relaxed);
    }

    /// Whether it failed lately: tried after the upstreams that did not.
    pub fn cooling(&self) -> bool {
        self.cooling_until_ms.load(Relaxed) > now_ms()
    }
}

/// The longest an upstream that keeps failing is put last.
pub const COOLING_MS_MAX: u64 = 60_000;

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A way to serve a model: which upstream, under which of its names.
#[derive(Debug, Clone)]
pub struct Route {
    pub upstream: Arc<Upstream>,
    pub upstream_model: String,
}

/// Every upstream of this node and the models each serves.
#[derive(Debug)]
pub struct Upstreams {
    policy: Policy,
    upstreams: Vec<Arc<Upstream>>,
    /// Client-facing model name → (index in `upstreams`, upstream's model name).
    routes: RwLock<BTreeMap<String, Vec<(usize, String)>>>,
}

/// Models one upstream may list (discovery is bounded).
pub const DISCOVERED_MODELS_MAX: usize = 1000;

impl Upstreams {
    /// Builds the clients; models named in the configuration are routed at once, the others
    /// after [`discover`](Self::discover).
    pub fn new(config: &UpstreamsConfig, env: impl Fn(&str) -> Option<String>) -> Result<Upstreams, String> {
        let mut upstreams = Vec::new();
        for u in &config.upstream {
            let key = match (&u.api_key, &u.api_key_env) {
                (Some(k), _) => Some(k.clone()),
                (None, Some(var)) => {
                    let key = env(var).filter(|k| !k.is_empty());
                    if key.is_none() {
                        tracing::warn!(upstream = %u.name, var, "the upstream's key variable is not set: requests to it go without a key");
                    }
                    key
                }
                (None, None) => None,
            };
            let timeouts = (Duration::from_millis(u.connect_timeout_ms), Duration::from_millis(u.timeout_ms));
            let provider = Provider::OpenAi(OpenAi::new(&u.name, &u.base_url, key, timeouts)?);
            upstreams.push(Arc::new(Upstream {
                provider,
                cost_micros_per_mtok: u.cost_micros_per_mtok,
                configured: u.models.clone(),
                ttfb_ms_ewma: AtomicU64::new(0),
                failures_in_a_row: AtomicU64::new(0),
                cooling_until_ms: AtomicU64::new(0),
                requests: AtomicU64::new(0),
                failures: AtomicU64::new(0),
            }));
        }
        let this = Upstreams { policy: config.policy, upstreams, routes: RwLock::new(BTreeMap::new()) };
        for (i, u) in this.upstreams.iter().enumerate() {
            if let Some(models) = &u.configured {
                this.add_routes(i, models.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
        }
        Ok(this)
    }

    fn add_routes(&self, index: usize, models: impl Iterator<Item = (String, String)>) {
        let mut routes = self.routes.write().expect("routes lock");
        for (name, upstream_model) in models {
            let list = routes.entry(name).or_default();
            if !list.iter().any(|(i, _)| *i == index) {
                list.push((index, upstream_model));
            }
        }
    }

    /// Asks each upstream configured without `models` for its list; returns the upstreams
    /// that could not be asked (the node serves without them and may ask again).
    pub async fn discover(&self) -> Vec<UpstreamError> {
        let mut failed = Vec::new();
        for (i, u) in self.upstreams.iter().enumerate() {
            if u.configured.is_some() {
                continue;
            }
            match u.provider.models().await {
                Ok(ids) => self.add_routes(i, ids.into_iter().take(DISCOVERED_MODELS_MAX).map(|id| (id.clone(), id))),
                Err(e) => failed.push(e),
            }
        }
        failed
    }

    pub fn is_empty(&self) -> bool {
        self.upstreams.is_empty()
    }

    pub fn upstreams(&self) -> &[Arc<Upstream>] {
        &self.upstreams
    }

    /// Whether some upstream serves `model`.
    pub fn serves(&self, model: &str) -> bool {
        self.routes.read().expect("routes lock").get(model).is_some_and(|l| !l.is_empty())
    }

    /// Every model served by an upstream, with the upstreams serving it (in route order).
    pub fn models(&self) -> Vec<(String, Vec<String>)> {
        let names: Vec<String> = self.routes.read().expect("routes lock").keys().cloned().collect();
        names.into_iter().map(|m| {
            let who = self.routes(&m).iter().map(|r| r.upstream.name().to_string()).collect();
            (m, who)
        }).collect()
    }

    /// The candidates for `model`, in the order the policy tries them.
    pub fn routes(&self, model: &str) -> Vec<Route> {
        let routes = self.routes.read().expect("routes lock");
        let Some(list) = routes.get(model) else { return Vec::new() };
        let mut out: Vec<(usize, Route)> = list
            .iter()
            .map(|(i, m)| (*i, Route { upstream: self.upstreams[*i].clone(), upstream_model: m.clone() }))
            .collect();
        // (A stable sort: ties keep the configured order.)
        match self.policy {
            Policy::Ordered => {}
            Policy::Cheapest => out.sort_by_key(|(_, r)| r.upstream.cost_micros_per_mtok.unwrap_or(u64::MAX)),
            Policy::Fastest => out.sort_by_key(|(_, r)| r.upstream.ttfb_ms()),
        }
        // One that failed lately goes after those that did not (still tried, as a last resort).
        out.sort_by_key(|(_, r)| r.upstream.cooling());
        out.into_iter().map(|(_, r)| r).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> UpstreamsConfig {
        UpstreamsConfig::parse(text).unwrap()
    }

    const TWO: &str = r#"
        policy = "cheapest"
        [[upstream]]
        name = "dear"
        base_url = "http://127.0.0.1:9/v1"
        cost_micros_per_mtok = 900
        models = { "m" = "m-large", "only-dear" = "x" }
        [[upstream]]
        name = "cheap"
        base_url = "http://127.0.0.1:9/v1"
        api_key_env = "CHEAP_KEY"
        cost_micros_per_mtok = 100
        models = { "m" = "m" }
    "#;

    #[test]
    fn candidates_are_ordered_by_policy() {
        let u = Upstreams::new(&config(TWO), |_| None).unwrap();
        let names = |model: &str| u.routes(model).iter().map(|r| (r.upstream.name().to_string(), r.upstream_model.clone())).collect::<Vec<_>>();
        assert_eq!(names("m"), [("cheap".into(), "m".into()), ("dear".into(), "m-large".into())]);
        assert_eq!(names("only-dear"), [("dear".to_string(), "x".to_string())]);
        assert!(names("nothing").is_empty() && !u.serves("nothing") && u.serves("m"));

        let fastest = UpstreamsConfig { policy: Policy::Fastest, ..config(TWO) };
        let u = Upstreams::new(&fastest, |_| None).unwrap();
        u.upstreams()[0].observe_ttfb(50);
        u.upstreams()[1].observe_ttfb(400);
        assert_eq!(u.routes("m")[0].upstream.name(), "dear");
        // A slow spell moves the mean a quarter of the way.
        u.upstreams()[0].observe_ttfb(1650);
        assert_eq!((u.upstreams()[0].ttfb_ms(), u.routes("m")[0].upstream.name()), (450, "cheap"));

        // A failing upstream goes last, whatever the policy, until it answers again.
        let u = Upstreams::new(&config(TWO), |_| None).unwrap();
        let cheap = u.upstreams()[1].clone();
        cheap.record_failure();
        assert!(cheap.cooling());
        assert_eq!(u.routes("m").iter().map(|r| r.upstream.name()).collect::<Vec<_>>(), ["dear", "cheap"]);
        cheap.record_success();
        assert_eq!(u.routes("m")[0].upstream.name(), "cheap");
        for _ in 0..20 {
            cheap.record_failure();
        }
        let pause = cheap.cooling_until_ms.load(Relaxed).saturating_sub(now_ms());
        assert!(pause <= COOLING_MS_MAX && pause > COOLING_MS_MAX / 2, "{pause}");
    }

    #[test]
    fn bad_configurations_are_refused_with_the_reason() {
        for (text, says) in [
            ("[[upstream]]\nname = \"a b\"\nbase_url = \"http://x/v1\"", "use letters"),
            ("[[upstream]]\nname = \"a\"\nbase_url = \"ftp://x\"", "http://"),
            ("[[upstream]]\nname = \"a\"\nbase_url = \"http://x\"\n[[upstream]]\nname = \"a\"\nbase_url = \"http://y\"", "named twice"),
            ("[[upstream]]\nname = \"a\"\nkind = \"grpc\"\nbase_url = \"http://x\"", "not supported"),
            ("[[upstream]]\nname = \"a\"\nbase_url = \"http://x\"\napi_key = \"k\"\napi_key_env = \"K\"", "not both"),
            ("[[upstream]]\nname = \"a\"\nbase_url = \"http://\"", "not a URL"),
            ("[[upstream]]\nname = \"a\"\nbase_url = \"http://127.0.0.1:99999/v1\"", "not a URL"),
            ("[[upstream]]\nname = \"a\"\nbase_url = \"http://x\"\ncolour = 1", "unknown field"),
            ("policy = \"random\"", "unknown variant"),
        ] {
            let e = UpstreamsConfig::parse(text).unwrap_err();
            assert!(e.contains(says), "{text}: {e}");
        }
        assert!(UpstreamsConfig::quick("pool=http://10.0.0.2:8080/v1").is_ok());
        assert!(UpstreamsConfig::quick("pool").unwrap_err().contains("NAME=URL"));
        // A name given on the command line that the file (or another flag) gives too.
        let mut c = UpstreamsConfig::parse("[[upstream]]\nname = \"pool\"\nbase_url = \"http://x/v1\"").unwrap();
        c.upstream.push(UpstreamsConfig::quick("pool=http://y/v1").unwrap());
        assert!(c.check_names().unwrap_err().contains("\"pool\" is named twice"));
    }

    #[test]
    fn usage_is_read_as_openai_reports_it() {
        let v: Value = serde_json::from_str(r#"{"usage":{"prompt_tokens":12,"completion_tokens":5,
            "prompt_tokens_details":{"cached_tokens":8},"completion_tokens_details":{"reasoning_tokens":2}}}"#).unwrap();
        assert_eq!(usage_of(&v), Some(UpstreamUsage { prompt_tokens: 12, cached_tokens: 8, completion_tokens: 5, reasoning_tokens: 2 }));
        assert_eq!(usage_of(&serde_json::json!({"usage": null})), None);
        assert_eq!(usage_of(&serde_json::json!({"usage": {"prompt_tokens": 1}})), None);
        // Embeddings report prompt tokens only.
        let e = serde_json::json!({"usage": {"prompt_tokens": 7, "total_tokens": 7}});
        assert_eq!(embedding_usage_of(&e), Some(UpstreamUsage { prompt_tokens: 7, ..UpstreamUsage::default() }));
        assert_eq!(embedding_usage_of(&serde_json::json!({"usage": {"prompt_tokens": "7"}})), None);
    }
}
