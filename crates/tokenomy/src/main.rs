//! `tokenomy`: the one binary. This crate is the composition root: it parses the command line,
//! loads models into the engine, wires the engine into the HTTP app and runs it. Nothing
//! depends on it; everything it does is wiring.

/// `println!` for command output that may go to a pipe closed early (`tokenomy … | head -1`):
/// the reader left, so the command ends quietly instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => { $crate::write_out(format_args!($($arg)*)) };
}

mod bench;
mod cli;
mod models;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tokenomy_api::{ApiConfig, AppState};
use tokenomy_engine::{Engine, ModelConfig};

#[derive(Parser)]
#[command(name = "tokenomy", version, about = "Serve, meter, charge and prove LLM tokens on your own machine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve models behind the OpenAI API.
    Serve(ServeArgs),
    /// Fetch a model: a local file, an https URL, or a Hugging Face `org/repo/file.gguf`.
    Pull {
        source: String,
        /// Expected sha256 (hex); known files are checked against the manifest anyway.
        #[arg(long)]
        sha256: Option<String>,
    },
    /// List the known models and the files in the model directory.
    Models,
    /// Print a GGUF file's architecture, context length, quantization, size and template.
    Inspect { file: PathBuf },
    /// Load-test an OpenAI-compatible server: N streams, shared-prefix or no-sharing prompts.
    Bench(bench::BenchArgs),
    /// Check a receipt offline: signature, fields, inclusion proof, checkpoint signature.
    Verify {
        /// The JSON document `GET /v1/receipts/{id}` returned.
        receipt: PathBuf,
        /// The node's verifier key (`GET /v1/node/key`, or DATA_DIR/node.pub), inline or a
        /// file; or a file of a ledger's node keys, one per line (`GET /v1/node/keys`), of
        /// which the one named like the receipt's node is used.
        #[arg(long)]
        key: String,
    },
    /// Check offline that the log grew append-only between two checkpoints.
    VerifyLog {
        /// The node's verifier key, inline or a file (or a file of keys, as for `verify`).
        #[arg(long)]
        key: String,
        /// The older checkpoint note (`GET /v1/log/checkpoint`).
        old: PathBuf,
        /// The newer checkpoint note.
        new: PathBuf,
        /// The consistency proof (`GET /v1/log/consistency?old=N&new=M`).
        proof: PathBuf,
    },
    /// Manage accounts on a running node (admin key).
    Accounts {
        #[command(flatten)]
        conn: cli::Conn,
        #[command(subcommand)]
        cmd: cli::Accounts,
    },
    /// Manage API keys on a running node (admin key).
    Keys {
        #[command(flatten)]
        conn: cli::Conn,
        #[command(subcommand)]
        cmd: cli::Keys,
    },
    /// Mint and transfer credits on a running node (admin key).
    Credits {
        #[command(flatten)]
        conn: cli::Conn,
        #[command(subcommand)]
        cmd: cli::Credits,
    },
    /// Check the ledger's invariants on a running node (admin key).
    Ledger {
        #[command(flatten)]
        conn: cli::Conn,
        #[command(subcommand)]
        cmd: cli::Ledger,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// A model name (see `tokenomy models`) or a GGUF path; repeat to serve several.
    #[arg(long = "model", default_value = models::DEFAULT_MODEL)]
    models: Vec<String>,
    #[arg(long, default_value = "127.0.0.1:8080", env = "TOKENOMY_LISTEN")]
    listen: SocketAddr,
    /// Where the node keeps its state (ledger, keys, receipts log).
    #[arg(long, env = "TOKENOMY_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// CPU threads for llama.cpp's kernels (default: all cores).
    #[arg(long, env = "TOKENOMY_THREADS")]
    threads: Option<i32>,
    /// Layers to put on the GPU, for a build with a GPU backend (`--features cuda`, vulkan or
    /// metal); default: all of them when a GPU is found. 0 keeps the model on the CPU.
    #[arg(long, alias = "gpu-layers", env = "TOKENOMY_N_GPU_LAYERS")]
    n_gpu_layers: Option<u32>,
    /// Chat template for models whose GGUF has none (or to override it): chatml, gemma or a file;
    /// `MODEL=TEMPLATE` gives it to one model only (repeatable), a bare one to every model.
    #[arg(long)]
    chat_template: Vec<String>,
    /// Tokens one request may hold, prompt + completion (default: the model's, at most 8192).
    #[arg(long, value_parser = clap::value_parser!(u32).range(16..))]
    ctx_size: Option<u32>,
    /// Sequences decoded together (continuous batching slots).
    #[arg(long, default_value_t = 8)]
    parallel: usize,
    /// KV cache cells in all, an equal share (a multiple of 256) per slot; a slot keeps its last
    /// request's tokens as prefix cache (default: parallel × ctx-size).
    #[arg(long)]
    kv_cells: Option<u32>,
    /// Requests that may wait for a slot; more get 429.
    #[arg(long, default_value_t = 64)]
    queue_max: usize,
    /// Maximum request body in bytes.
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    body_bytes_max: usize,
    /// A shared PostgreSQL ledger (`postgres://…`); default: SQLite in the data dir.
    #[arg(long, env = "TOKENOMY_DATABASE", hide_env_values = true)]
    database: Option<String>,
    /// Accept requests without an API key, charging them to the local user (DATA_DIR/user.key).
    /// For one person on their own machine only.
    #[arg(long)]
    no_auth: bool,
    /// The receipts log's name, used when the node key is first created.
    #[arg(long, env = "TOKENOMY_ORIGIN")]
    origin: Option<String>,
    /// How long a graceful shutdown (SIGTERM) lets answers in flight run on; past it they are
    /// cut, and charged for what they produced. Keep it under the supervisor's own grace period
    /// (systemd's 90 s, Kubernetes' 30 s) less a few seconds for settling.
    #[arg(long, default_value_t = 20_000, env = "TOKENOMY_DRAIN_TIMEOUT_MS")]
    drain_timeout_ms: u64,
    /// How long after SIGTERM the node goes on taking requests while `/ready` answers 503
    /// (`draining`), so that a load balancer stops sending before the listener closes; the
    /// drain (`--drain-timeout-ms`) starts after it.
    #[arg(long, default_value_t = 0, env = "TOKENOMY_SHUTDOWN_DELAY_MS")]
    shutdown_delay_ms: u64,
    /// Remote OpenAI-compatible providers, from a TOML file of `[[upstream]]` tables (name,
    /// base_url, api_key_env, models, cost_micros_per_mtok, timeouts; `policy` at the top):
    /// models the local engine does not serve are served through them, charged and proven the
    /// same way.
    #[arg(long, env = "TOKENOMY_UPSTREAMS")]
    upstreams: Option<PathBuf>,
    /// An upstream as NAME=URL (`pool=http://10.0.0.2:8080/v1`): every model it lists, its key
    /// from TOKENOMY_UPSTREAM_<NAME>_KEY; repeat for several.
    #[arg(long = "upstream", value_name = "NAME=URL")]
    upstream: Vec<String>,
    /// Open connections at most; past it the node stops accepting until one closes (the
    /// process's open-file limit is raised to its hard limit at start).
    #[arg(long, default_value_t = 4096, env = "TOKENOMY_CONNECTIONS_MAX")]
    connections_max: usize,
    /// A connection that sends no complete request headers for this long (a silent client,
    /// an idle keep-alive connection) is closed.
    #[arg(long, default_value_t = 30_000, env = "TOKENOMY_HEADER_READ_TIMEOUT_MS")]
    header_read_timeout_ms: u64,
    /// A request body that sends nothing for this long is refused (408).
    #[arg(long, default_value_t = 60_000, env = "TOKENOMY_BODY_READ_TIMEOUT_MS")]
    body_read_timeout_ms: u64,
}

/// Raises the soft open-file limit to the hard one: each connection is a descriptor, and
/// distributions' default soft limit (1024) is below `--connections-max`.
fn raise_open_file_limit(connections_max: usize) {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) if (n as usize) < connections_max + 256 => tracing::warn!(
            open_files_max = n,
            connections_max,
            "the open-file limit is below --connections-max: connections past it will wait (raise `ulimit -n`)"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "raising the open-file limit"),
    }
}

/// The upstreams of `--upstreams` and `--upstream`, with the models they list asked for once
/// now (a failure is logged, and asked again every minute, as the lists may change).
async fn upstreams(args: &ServeArgs) -> Result<Option<Arc<tokenomy_upstream::Upstreams>>> {
    let mut config = match &args.upstreams {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            tokenomy_upstream::UpstreamsConfig::parse(&text).map_err(anyhow::Error::msg)?
        }
        None => tokenomy_upstream::UpstreamsConfig::default(),
    };
    for spec in &args.upstream {
        config.upstream.push(tokenomy_upstream::UpstreamsConfig::quick(spec).map_err(anyhow::Error::msg)?);
    }
    config.check_names().map_err(anyhow::Error::msg)?;
    if config.upstream.is_empty() {
        return Ok(None);
    }
    let u = Arc::new(tokenomy_upstream::Upstreams::new(&config, |var| std::env::var(var).ok()).map_err(anyhow::Error::msg)?);
    let failed = u.discover().await;
    for e in &failed {
        tracing::warn!(error = %e, "an upstream's models could not be listed; asking again every 5 s until it answers");
    }
    let models = u.models();
    tracing::info!(upstreams = u.upstreams().len(), models = ?models.iter().map(|(m, _)| m).collect::<Vec<_>>(), "upstreams");
    let again = u.clone();
    tokio::spawn(async move {
        let mut missing = !failed.is_empty();
        loop {
            // An upstream not yet listed is asked again soon (its models are not served until
            // then); once all have answered, every minute (their lists may change).
            tokio::time::sleep(Duration::from_secs(if missing { 5 } else { 60 })).await;
            let failed = again.discover().await;
            if missing && failed.is_empty() {
                tracing::info!(models = ?again.models().iter().map(|(m, _)| m).collect::<Vec<_>>(), "every upstream listed its models");
            }
            missing = !failed.is_empty();
            for e in failed {
                tracing::debug!(error = %e, "listing an upstream's models");
            }
        }
    });
    Ok(Some(u))
}

fn write_out(line: std::fmt::Arguments) {
    use std::io::Write;
    if let Err(e) = writeln!(std::io::stdout().lock(), "{line}") {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("writing to stdout: {e}");
        }
        std::process::exit(if e.kind() == std::io::ErrorKind::BrokenPipe { 0 } else { 1 });
    }
}

fn main() {
    if let Err(e) = run() {
        // The error and its causes, as a person reads them: not `main`'s `Debug` print, which
        // adds a backtrace whenever RUST_BACKTRACE is set.
        eprintln!("Error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new()?;
    match cli.command {
        Command::Serve(args) => rt.block_on(serve(args)),
        Command::Pull { source, sha256 } => rt.block_on(models::pull(&source, sha256.as_deref())).map(|_| ()),
        Command::Models => list_models(),
        Command::Inspect { file } => inspect(&file),
        Command::Bench(args) => rt.block_on(bench::run(args)),
        Command::Verify { receipt, key } => cli::verify(&receipt, &key),
        Command::VerifyLog { key, old, new, proof } => cli::verify_log(&key, &old, &new, &proof),
        Command::Accounts { conn, cmd } => rt.block_on(cli::accounts(conn, cmd)),
        Command::Keys { conn, cmd } => rt.block_on(cli::keys(conn, cmd)),
        Command::Credits { conn, cmd } => rt.block_on(cli::credits(conn, cmd)),
        Command::Ledger { conn, cmd } => rt.block_on(cli::ledger(conn, cmd)),
    }
}

fn list_models() -> Result<()> {
    let dir = models::models_dir();
    out!("model directory: {}", dir.display());
    for k in models::KNOWN {
        let here = if dir.join(k.file).is_file() { "downloaded" } else { "not downloaded" };
        out!("{:<20} {:<14} {}", k.name, here, k.about);
    }
    if let Ok(entries) = std::fs::read_dir(&dir) {
        let mut others: Vec<String> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".gguf") && !models::KNOWN.iter().any(|k| k.file == n))
            .collect();
        others.sort();
        for n in others {
            out!("{:<20} downloaded     (local file)", n.trim_end_matches(".gguf"));
        }
    }
    Ok(())
}

fn inspect(file: &std::path::Path) -> Result<()> {
    let s = tokenomy_engine::gguf::inspect(file).map_err(anyhow::Error::msg)?;
    out!("file:          {}", file.display());
    if let Some(name) = &s.name {
        out!("name:          {name}");
    }
    out!("architecture:  {}", s.architecture);
    out!("context:       {}", s.context_length.map_or("unknown".into(), |c| c.to_string()));
    out!("quantization:  {}", s.quantization);
    out!("size:          {} bytes ({:.1} MiB)", s.size_bytes, s.size_bytes as f64 / (1024.0 * 1024.0));
    out!("tensors:       {}", s.tensors);
    out!("chat template: {}", if s.has_chat_template { "yes" } else { "no (serve with --chat-template)" });
    Ok(())
}

async fn serve(args: ServeArgs) -> Result<()> {
    // Models are resolved first: a typo must not leave a new data dir (keys, a grant) behind.
    let configs = model_configs(&args)?;
    let upstreams = upstreams(&args).await?;
    // So is a port already taken: said before a first run's setup and the models' load.
    if args.listen.port() != 0 {
        drop(std::net::TcpListener::bind(args.listen).with_context(|| format!("binding {}", args.listen))?);
    }
    let data_dir = args.data_dir.clone().unwrap_or_else(|| models::home().join("data"));
    // (Billing::open creates the data dir, readable by its owner only.)
    let billing = open_billing(&args, &data_dir).await?;
    let user_key = data_dir.join("user.key");
    if args.no_auth && !user_key.exists() {
        anyhow::bail!(
            "--no-auth charges keyless requests to the local user whose key is {}, and this data dir has none \
             (it joined a ledger that another data dir set up): copy that data dir's user.key here, or serve without --no-auth",
            user_key.display()
        );
    }
    tracing::info!(models = ?configs.iter().map(|c| &c.name).collect::<Vec<_>>(), "loading");
    let upstream_models: Vec<String> = upstreams.as_ref().map(|u| u.models().into_iter().map(|(m, _)| m).collect()).unwrap_or_default();
    let served: Vec<&str> = configs.iter().map(|c| c.name.as_str()).chain(upstream_models.iter().map(String::as_str)).collect();
    log_prices(&billing, &served, &data_dir);
    let engine = tokio::task::spawn_blocking(move || Engine::load(&configs)).await?.map_err(anyhow::Error::msg)?;
    let upkeep = billing.spawn_upkeep();
    let mut state = AppState::new(Arc::new(engine), ApiConfig { body_bytes_max: args.body_bytes_max }).with_billing(billing.clone(), args.no_auth);
    if let Some(u) = upstreams {
        state = state.with_upstreams(u);
    }
    let listener = tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, data_dir = %data_dir.display(), "serving the OpenAI API at http://{addr}/v1");
    if args.no_auth {
        tracing::warn!("--no-auth: ANYONE who can reach http://{addr} spends the local user's credits without a key");
    } else if !user_key.exists() {
        eprintln!("\n  This data dir has no local user (it joined an existing ledger): create accounts and keys with `tokenomy accounts create` and `tokenomy keys create`.\n");
    } else {
        eprintln!(
            "\n  API key for the local user: {}\n  try: curl http://{addr}/v1/chat/completions -H \"Authorization: Bearer $(cat {})\" \\\n         -H 'Content-Type: application/json' -d '{{\"model\":\"{}\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}]}}'\n",
            data_dir.join("user.key").display(),
            data_dir.join("user.key").display(),
            args.models.first().map(|m| models::resolve(m).map(|r| r.0).unwrap_or_default()).unwrap_or_default(),
        );
    }
    let drain_max = Duration::from_millis(args.drain_timeout_ms);
    let delay = Duration::from_millis(args.shutdown_delay_ms);
    raise_open_file_limit(args.connections_max);
    let limits = tokenomy_api::ServeLimits {
        connections_max: args.connections_max,
        header_read_timeout: Duration::from_millis(args.header_read_timeout_ms.max(1)),
        body_read_timeout: Duration::from_millis(args.body_read_timeout_ms.max(1)),
    };
    tokenomy_api::serve_with_limits(listener, state.clone(), shutdown_signal(state.clone(), delay, drain_max), limits).await?;
    tracing::info!("shutting down: waiting for in-flight metering");
    if !state.drain(Duration::from_secs(30)).await {
        tracing::warn!("some metering tasks did not finish in time");
    }
    upkeep.abort();
    // The last checkpoint, published with the receipts settled since the last tick, so that
    // the other nodes of a shared ledger serve them once this one is gone.
    if let Err(e) = billing.publish_all().await {
        tracing::warn!(error = %e, "final checkpoint");
    }
    Ok(())
}

/// The price each served model pays, and a warning for a price set for a model that is neither
/// served nor a known model (a typo there would leave a model at the default price unnoticed).
fn log_prices(billing: &tokenomy_billing::Billing, served: &[&str], data_dir: &std::path::Path) {
    let is = |m: &str, n: &str| m == n || tokenomy_billing::config::env_form(m) == n;
    let known = |n: &str| served.iter().any(|m| is(m, n)) || models::KNOWN.iter().any(|k| is(k.name, n));
    for name in billing.config().prices.models.keys().filter(|n| !known(n)) {
        tracing::warn!(
            model = %name,
            "{} or a TOKENOMY_PRICES__ variable sets a price for model `{name}`, which this node does not serve (served: {served:?}); check the name",
            data_dir.join("tokenomy.toml").display()
        );
    }
    for name in served {
        let p = billing.price(name);
        tracing::info!(
            model = %name,
            input = p.input_micros_per_mtok,
            cached_input = p.cached_input_micros_per_mtok,
            output = p.output_micros_per_mtok,
            "price (micro-credits per million tokens)"
        );
    }
}

async fn open_billing(args: &ServeArgs, data_dir: &std::path::Path) -> Result<Arc<tokenomy_billing::Billing>> {
    let env = std::env::vars().filter(|(k, _)| k.starts_with("TOKENOMY_PRICES__") || k.starts_with("TOKENOMY_BILLING__")).collect();
    let opts = tokenomy_billing::OpenOptions { data_dir: data_dir.to_path_buf(), database_url: args.database.clone(), origin: args.origin.clone(), env };
    let (billing, first) = tokenomy_billing::Billing::open(opts).await.map_err(|e| match e {
        // (At start a store that fails is a setting to fix, not a moment to wait out.)
        tokenomy_billing::BillingError::Unavailable(cause) => anyhow::anyhow!("opening the ledger: {cause}"),
        e => anyhow::anyhow!("opening the ledger: {e}"),
    })?;
    if let Some(f) = first {
        eprintln!(
            "\n  First start: created an admin key ({}) and a local user account {} with {} credits,\n  whose inference key is in {}. Keys are shown once and stored only as hashes.\n",
            data_dir.join("admin.key").display(),
            f.user_account,
            f.grant_micros as f64 / 1e6,
            data_dir.join("user.key").display(),
        );
    }
    tracing::info!(origin = billing.origin(), key = %billing.verifier(), "receipts log");
    Ok(billing)
}

fn model_configs(args: &ServeArgs) -> Result<Vec<ModelConfig>> {
    let resolved: Vec<_> = args.models.iter().map(|m| models::resolve(m)).collect::<Result<_>>()?;
    let names: Vec<&str> = resolved.iter().map(|(n, _)| n.as_str()).collect();
    let templates = chat_templates(&args.chat_template, &names)?;
    resolved
        .into_iter()
        .zip(templates)
        .map(|((name, path), template)| {
            let mut c = ModelConfig::new(name, path);
            if let Some(t) = args.threads {
                c.threads = t;
            }
            c.chat_template = template;
            c.gpu_layers = args.n_gpu_layers;
            c.slots = args.parallel.max(1);
            c.ctx_tokens_max = args.ctx_size;
            c.kv_cells_max = args.kv_cells;
            c.queue_max = args.queue_max.max(1);
            Ok(c)
        })
        .collect()
}

/// Each model's `--chat-template`: its own (`NAME=TEMPLATE`), else the bare one, else none.
fn chat_templates(given: &[String], names: &[&str]) -> Result<Vec<Option<String>>> {
    // `t`'s template when it is `name=TEMPLATE`.
    let of = |t: &'_ str, name: &str| t.strip_prefix(name).and_then(|r| r.strip_prefix('=')).map(str::to_string);
    let own = |name: &str| given.iter().find_map(|t| of(t, name));
    let bare: Vec<&String> = given.iter().filter(|t| names.iter().all(|n| of(t, n).is_none())).collect();
    if let Some((name, _)) = bare.iter().filter(|t| !std::path::Path::new(t.as_str()).exists()).find_map(|t| t.split_once('=')) {
        anyhow::bail!("--chat-template: no model is served as {name:?} (models: {}); MODEL=TEMPLATE names a model by its served name", names.join(", "));
    }
    if bare.len() > 1 {
        anyhow::bail!("--chat-template: give one template for every model, or MODEL=TEMPLATE for each (models: {})", names.join(", "));
    }
    Ok(names.iter().map(|n| own(n).or(bare.first().map(|b| b.to_string()))).collect())
}

/// How long the answers cut at a shutdown's deadline have to be charged before the process
/// stops anyway.
const SETTLE_MAX: Duration = Duration::from_secs(5);

/// SIGINT or SIGTERM.
async fn a_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// The first signal starts a graceful shutdown: new connections are refused and in-flight
/// answers finish. Past `drain_max`, or at a second signal, the answers still running are cut
/// (`cancel_all`): each ends as cancelled and is charged for what it produced, like a client
/// that disconnects, and the node then stops as after a drain. A third signal, or
/// [`SETTLE_MAX`] after the cut, stops the process at once: the holds of answers cut off then
/// are voided when they time out, as after a crash.
async fn shutdown_signal(state: tokenomy_api::AppState, delay: Duration, drain_max: Duration) {
    a_signal().await;
    state.start_draining();
    let mut cut_now = false;
    if !delay.is_zero() {
        tracing::info!("signal received; /ready says draining, serving on for {delay:?} (a second signal cuts the answers in flight)");
        tokio::select! {
            _ = a_signal() => cut_now = true,
            _ = tokio::time::sleep(delay) => {}
        }
    }
    tracing::info!("closing the listener; finishing in-flight requests (a second signal cuts them, charged for what they produced)");
    let backend = state.backend.clone();
    tokio::spawn(async move {
        if !cut_now {
            tokio::select! {
                _ = a_signal() => {}
                _ = tokio::time::sleep(drain_max) => tracing::warn!("in-flight requests still running after {drain_max:?}"),
            }
        }
        tracing::warn!("cutting the answers in flight, charged for what they produced (another signal stops at once)");
        backend.cancel_all();
        tokio::select! {
            _ = a_signal() => tracing::warn!("another signal: stopping now"),
            _ = tokio::time::sleep(SETTLE_MAX) => tracing::warn!("cut requests still unsettled after {SETTLE_MAX:?}: stopping now"),
        }
        hard_stop();
    });
}

/// Ends the process with status 1 at once. Not `std::process::exit`: its `atexit` handlers
/// run llama.cpp's static destructors (and CUDA's teardown) while the engine's threads are
/// still decoding, which ended 3 in 10 hard stops with SIGSEGV (SIGABRT on CUDA). What must
/// survive is already durable: the ledger commits each write, a cut answer's hold is voided
/// at the next start or when it times out.
#[allow(unsafe_code)]
fn hard_stop() -> ! {
    use std::io::Write;
    let _ = std::io::stderr().flush();
    let _ = std::io::stdout().flush();
    // SAFETY: `_exit` takes no pointers and never returns; skipping destructors and `atexit`
    // handlers is its purpose.
    unsafe { libc::_exit(1) }
}

#[cfg(test)]
mod tests {
    use super::chat_templates;

    #[test]
    fn a_chat_template_goes_to_the_model_it_names_or_to_all() {
        let given = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let names = ["smollm2", "gemma3-270m"];
        let own = chat_templates(&given(&["gemma3-270m=gemma"]), &names).unwrap();
        assert_eq!(own, [None, Some("gemma".to_string())], "smollm2 keeps its own");
        let all = chat_templates(&given(&["chatml"]), &names).unwrap();
        assert_eq!(all, [Some("chatml".to_string()), Some("chatml".to_string())]);
        let both = chat_templates(&given(&["chatml", "gemma3-270m=gemma"]), &names).unwrap();
        assert_eq!(both, [Some("chatml".to_string()), Some("gemma".to_string())]);
        assert!(chat_templates(&given(&["chatml", "gemma"]), &names).is_err());
        let e = chat_templates(&given(&["nosuch=chatml"]), &names).unwrap_err().to_string();
        assert!(e.contains("no model is served as \"nosuch\"") && e.contains("smollm2"), "{e}");
    }
}
