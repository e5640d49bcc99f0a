//! `tokenomy bench`: a load generator for any OpenAI-compatible server (ours or a peer's).
//!
//! N concurrent streams, each sending its requests one after another as streaming chat
//! completions; a fixed seed makes the prompt set identical across servers. Two workloads:
//! `shared-prefix` (an agent-style system prompt of about `--prefix-words` words shared by all
//! requests, then a distinct task) and `no-sharing` (every request's prompt is distinct from its
//! first word). `ignore_eos` makes every request produce exactly `--max-tokens` tokens on
//! servers that honour it (tokenomy and llama-server do), so servers are compared on equal work.
//! Reported: aggregate completion tok/s, TTFT p50/p99 (and the p50 of each stream's first
//! request: every stream starts at once, with nothing cached), time per output token p50/p99,
//! errors, and with `--server-pid` the server's CPU-seconds per million tokens (from /proc).

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use serde_json::{json, Value};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    SharedPrefix,
    NoSharing,
}

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// The server's OpenAI base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080/v1")]
    url: String,
    /// Model id (default: the first of GET /models).
    #[arg(long)]
    model: Option<String>,
    #[arg(long, default_value_t = 8)]
    streams: usize,
    /// Requests each stream sends, one after another.
    #[arg(long, default_value_t = 2)]
    requests_per_stream: usize,
    #[arg(long, value_enum, default_value = "shared-prefix")]
    workload: Workload,
    #[arg(long, default_value_t = 64)]
    max_tokens: u32,
    /// Length of the shared system prompt (or of each distinct prompt), in words.
    #[arg(long, default_value_t = 180)]
    prefix_words: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, env = "TOKENOMY_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// The server's process id, to report its CPU-seconds per million tokens.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

const WORDS: &[&str] = &[
    "agent", "tool", "file", "search", "result", "account", "invoice", "token", "price", "model", "request", "answer",
    "careful", "always", "never", "output", "format", "json", "list", "check", "user", "report", "error", "retry",
    "budget", "limit", "cache", "prefix", "memory", "plan", "step", "verify", "summary", "data", "table", "value",
];

const TASKS: &[&str] = &[
    "Summarise the last report in two sentences.",
    "List three risks of the plan.",
    "Write a JSON object with a name and a price.",
    "Explain what a cache is to a child.",
    "Suggest a name for a billing service.",
    "Give two reasons to verify a result.",
    "Describe a retry policy briefly.",
    "Name four colours and one animal.",
];

/// xorshift64*: deterministic prompts from `--seed`.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn words(&mut self, n: usize) -> String {
        (0..n).map(|_| WORDS[(self.next() % WORDS.len() as u64) as usize]).collect::<Vec<_>>().join(" ")
    }
}

fn system_prompt(words: &str) -> String {
    format!("You are a careful assistant working for an agent platform. Follow the operator's rules exactly. Rules: {words}.")
}

/// Every request's messages, identical for a given seed and workload.
fn prompts(a: &BenchArgs) -> Vec<Value> {
    let mut rng = Rng(a.seed.max(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let shared = system_prompt(&rng.words(a.prefix_words));
    (0..a.streams * a.requests_per_stream)
        .map(|i| {
            let task = TASKS[i % TASKS.len()];
            let system = match a.workload {
                Workload::SharedPrefix => shared.clone(),
                // distinct from the first token on
                Workload::NoSharing => format!("Session {i} {}. {}", rng.next() % 1_000_000, system_prompt(&rng.words(a.prefix_words))),
            };
            json!([{"role": "system", "content": system}, {"role": "user", "content": format!("Task {i}: {task}")}])
        })
        .collect()
}

#[derive(Debug, Default, Clone)]
struct One {
    ttft_ms: Option<f64>,
    tpot_ms: Option<f64>,
    completion_tokens: u64,
    error: Option<String>,
}

async fn one(client: &reqwest::Client, a: &BenchArgs, model: &str, messages: &Value, seed: u64) -> One {
    let body = json!({
        "model": model, "messages": messages, "max_tokens": a.max_tokens, "temperature": 0.8, "seed": seed,
        "stream": true, "stream_options": {"include_usage": true}, "ignore_eos": true,
    });
    let mut req = client.post(format!("{}/chat/completions", a.url.trim_end_matches('/'))).json(&body);
    if let Some(k) = &a.api_key {
        req = req.bearer_auth(k);
    }
    let t0 = Instant::now();
    let resp = match req.send().await {
        Ok(r) if r.status().is_success() => r,
        Ok(r) => return One { error: Some(format!("HTTP {}", r.status())), ..One::default() },
        Err(e) => return One { error: Some(error_chain(&e)), ..One::default() },
    };
    let (mut first, mut last, mut chunks, mut usage) = (None, None, 0u64, None);
    let mut buf = String::new();
    let mut body = resp.bytes_stream();
    while let Some(part) = body.next().await {
        let Ok(bytes) = part else { return One { error: Some("stream broken".into()), ..One::default() } };
        buf.push_str(&String::from_utf8_lossy(&bytes));
        while let Some(nl) = buf.find('\n') {
            let line: String = buf.drain(..=nl).collect();
            let Some(data) = line.trim().strip_prefix("data: ") else { continue };
            let Ok(v) = serde_json::from_str::<Value>(data) else { continue };
            if v["choices"][0]["delta"]["content"].as_str().is_some_and(|c| !c.is_empty()) {
                let now = t0.elapsed();
                first.get_or_insert(now);
                last = Some(now);
                chunks += 1;
            }
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                usage = Some(n);
            }
        }
    }
    let tokens = usage.unwrap_or(chunks);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let tpot = match (first, last) {
        (Some(f), Some(l)) if tokens > 1 => Some((ms(l) - ms(f)) / (tokens - 1) as f64),
        _ => None,
    };
    One { ttft_ms: first.map(ms), tpot_ms: tpot, completion_tokens: tokens, error: None }
}

/// An error with its causes ("error sending request" alone does not say why).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        out.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    out
}

fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("reading /proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').context("malformed stat")?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?; // utime + stime
    let hz = std::process::Command::new("getconf").arg("CLK_TCK").output().ok().and_then(|o| String::from_utf8(o.stdout).ok()).and_then(|s| s.trim().parse::<f64>().ok()).unwrap_or(100.0);
    Ok(ticks / hz)
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[(((v.len() - 1) as f64) * p).round() as usize]
}

pub async fn run(a: BenchArgs) -> Result<()> {
    if a.streams == 0 || a.requests_per_stream == 0 || a.max_tokens == 0 {
        bail!("--streams, --requests-per-stream and --max-tokens must be positive");
    }
    // No connection reuse: a server may close an idle keep-alive connection just as the next
    // request of a stream goes out on it ("connection closed before message completed", seen
    // with llama-server), which would count as that server's error. A fresh loopback
    // connection per request costs microseconds, the same for every server.
    let client = reqwest::Client::builder().timeout(Duration::from_secs(3600)).pool_max_idle_per_host(0).build()?;
    let model = match &a.model {
        Some(m) => m.clone(),
        None => {
            let mut req = client.get(format!("{}/models", a.url.trim_end_matches('/')));
            if let Some(k) = &a.api_key {
                req = req.bearer_auth(k);
            }
            let v: Value = req.send().await?.json().await?;
            v["data"][0]["id"].as_str().context("GET /models listed no model")?.to_string()
        }
    };
    let all = prompts(&a);
    let cpu0 = a.server_pid.map(cpu_seconds).transpose()?;
    let t0 = Instant::now();
    let streams = (0..a.streams).map(|s| {
        let (client, a, model, all) = (&client, &a, &model, &all);
        async move {
            let mut out = Vec::new();
            for r in 0..a.requests_per_stream {
                let i = s * a.requests_per_stream + r;
                out.push(one(client, a, model, &all[i], a.seed.wrapping_add(i as u64)).await);
            }
            out
        }
    });
    let results: Vec<One> = futures::future::join_all(streams).await.into_iter().flatten().collect();
    let wall_s = t0.elapsed().as_secs_f64();
    let cpu_s = match (a.server_pid, cpu0) {
        (Some(pid), Some(c0)) => Some(cpu_seconds(pid)? - c0),
        _ => None,
    };
    let tokens: u64 = results.iter().map(|r| r.completion_tokens).sum();
    let errors: Vec<&String> = results.iter().filter_map(|r| r.error.as_ref()).collect();
    let mut ttft: Vec<f64> = results.iter().filter_map(|r| r.ttft_ms).collect();
    // Each stream's first request: all streams start at once, nothing is cached yet.
    let mut ttft_first: Vec<f64> = results.iter().step_by(a.requests_per_stream).filter_map(|r| r.ttft_ms).collect();
    let mut tpot: Vec<f64> = results.iter().filter_map(|r| r.tpot_ms).collect();
    let report = json!({
        "url": a.url, "model": model, "workload": format!("{:?}", a.workload), "streams": a.streams,
        "requests": results.len(), "max_tokens": a.max_tokens, "seed": a.seed, "wall_s": wall_s,
        "completion_tokens": tokens, "completion_tok_per_s": tokens as f64 / wall_s,
        "ttft_ms_p50": pct(&mut ttft, 0.5), "ttft_ms_p99": pct(&mut ttft, 0.99),
        "ttft_ms_p50_first": pct(&mut ttft_first, 0.5),
        "tpot_ms_p50": pct(&mut tpot, 0.5), "tpot_ms_p99": pct(&mut tpot, 0.99),
        "ttft_ms_each": results.iter().map(|r| r.ttft_ms).collect::<Vec<_>>(),
        "errors": errors.len(), "first_error": errors.first(),
        "cpu_s": cpu_s, "cpu_s_per_mtok": cpu_s.map(|c| c / (tokens.max(1) as f64) * 1e6),
    });
    if a.json {
        out!("{report}");
    } else {
        out!("{} {:?}: {} streams × {} requests × {} tokens on {}", a.url, a.workload, a.streams, a.requests_per_stream, a.max_tokens, model);
        out!("  completion tokens {tokens} in {wall_s:.1} s: {:.1} tok/s", tokens as f64 / wall_s);
        out!("  TTFT p50 {:.0} ms  p99 {:.0} ms;  time per output token p50 {:.1} ms  p99 {:.1} ms", report["ttft_ms_p50"].as_f64().unwrap_or(f64::NAN), report["ttft_ms_p99"].as_f64().unwrap_or(f64::NAN), report["tpot_ms_p50"].as_f64().unwrap_or(f64::NAN), report["tpot_ms_p99"].as_f64().unwrap_or(f64::NAN));
        out!("  TTFT p50 of each stream's first request {:.0} ms", report["ttft_ms_p50_first"].as_f64().unwrap_or(f64::NAN));
        out!("  errors {}{}", errors.len(), errors.first().map(|e| format!(" (first: {e})")).unwrap_or_default());
        if let Some(c) = cpu_s {
            out!("  server CPU {c:.1} s: {:.0} CPU-s per million completion tokens", c / (tokens.max(1) as f64) * 1e6);
        }
    }
    // The report is printed either way; a run where nothing succeeded is a failure to scripts.
    if errors.len() == results.len() {
        let hint = match errors.first().map(|e| e.as_str()) {
            Some(e) if e.contains("401") => " (the server wants an API key: --api-key or TOKENOMY_API_KEY)",
            _ => "",
        };
        bail!("every request failed{hint}: {}", errors.first().map_or("", |e| e.as_str()));
    }
    Ok(())
}
