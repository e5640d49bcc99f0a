//! Tests of the built `tokenomy` binary: `inspect`, `pull` (local file, URL, Hugging Face path
//! against a local HTTP server), and serving each required architecture.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod admin_cli;
mod bench;
mod crash;
mod layering;
mod limits;
mod upstream;

use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_tokenomy");

fn models_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TOKENOMY_TEST_MODELS") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("TOKENOMY_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".tokenomy"));
    home.join("models")
}

pub fn model(file: &str) -> PathBuf {
    let p = models_dir().join(file);
    assert!(p.is_file(), "{} missing: run scripts/fetch-test-models.sh", p.display());
    p
}

pub const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const QWEN: &str = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf";
pub const GEMMA: &str = "gemma-3-270m-q4_k_m.gguf";

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub struct Node {
    child: Child,
    pub base: String,
    pub dir: PathBuf,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(args: &[&str]) -> Node {
    serve_in(&tempdir("serve"), args, &[])
}

impl Node {
    /// The local user's inference key, written at first start.
    pub fn user_key(&self) -> String {
        std::fs::read_to_string(self.dir.join("user.key")).unwrap().trim().to_string()
    }

    pub fn admin_key(&self) -> String {
        std::fs::read_to_string(self.dir.join("admin.key")).unwrap().trim().to_string()
    }

    /// `kill -9`: no shutdown, no drain.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the binary on `dir` and waits until it is ready.
pub fn serve_in(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Node {
    let port = free_port();
    let mut cmd = Command::new(BIN);
    cmd.arg("serve").args(args).args(["--listen", &format!("127.0.0.1:{port}"), "--threads", "2", "--ctx-size", "1024", "--parallel", "2"]);
    cmd.arg("--data-dir").arg(dir).stdout(Stdio::null()).stderr(Stdio::null());
    cmd.envs(env.iter().copied());
    let child = cmd.spawn().unwrap();
    let node = Node { child, base: format!("http://127.0.0.1:{port}"), dir: dir.to_path_buf() };
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(r) = reqwest::blocking::get(format!("{}/ready", node.base)) {
            if r.status().is_success() {
                return node;
            }
        }
        assert!(Instant::now() < deadline, "node did not become ready");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn chat(node: &Node, model: &str) -> (u16, Value) {
    let body = json!({"model": model, "temperature": 0, "max_tokens": 16, "messages": [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "What is the capital of France?"}]});
    let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(120)).build().unwrap();
    let r = client.post(format!("{}/v1/chat/completions", node.base)).bearer_auth(node.user_key()).json(&body).send().unwrap();
    (r.status().as_u16(), r.json().unwrap())
}

pub fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tokenomy-it-{tag}-{}-{}", std::process::id(), free_port()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn run(args: &[&str], env: &[(&str, &Path)]) -> (bool, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn inspect_prints_the_facts_of_each_model() {
    for (file, arch, quant, template) in [(SMOLLM2, "llama", "Q4_1", "yes"), (QWEN, "qwen2", "Q4_K_M", "yes"), (GEMMA, "gemma3", "Q4_K_M", "no")] {
        let (ok, out) = run(&["inspect", model(file).to_str().unwrap()], &[]);
        assert!(ok, "{out}");
        assert!(out.contains(&format!("architecture:  {arch}")), "{out}");
        assert!(out.contains(&format!("quantization:  {quant}")), "{out}");
        assert!(out.contains(&format!("chat template: {template}")), "{out}");
        assert!(out.contains("context:") && out.contains("size:"), "{out}");
    }
    let (ok, out) = run(&["inspect", "/nonexistent.gguf"], &[]);
    assert!(!ok && out.contains("nonexistent"), "{out}");
}

/// A URL on a one-shot server that answers its first request with `head` and then `body`,
/// and closes (a server killed mid-transfer).
fn serve_once(path: &str, head: String, body: Vec<u8>) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}{path}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut req = [0u8; 4096];
        let _ = std::io::Read::read(&mut conn, &mut req);
        let _ = std::io::Write::write_all(&mut conn, head.as_bytes());
        let _ = std::io::Write::write_all(&mut conn, &body);
    });
    url
}

#[test]
fn pull_from_a_file_a_url_and_a_hugging_face_path_checks_sha256() {
    let home = tempdir("pull");
    let serve_dir = tempdir("hf");
    // a local "Hugging Face" layout: ORG/REPO/resolve/main/FILE
    let hf_file = serve_dir.join("org/repo/resolve/main");
    std::fs::create_dir_all(&hf_file).unwrap();
    std::fs::copy(model(SMOLLM2), hf_file.join(SMOLLM2)).unwrap();
    let port = free_port();
    let mut server = Command::new("python3")
        .args(["-m", "http.server", &port.to_string(), "--bind", "127.0.0.1"])
        .current_dir(&serve_dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let endpoint = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while reqwest::blocking::get(&endpoint).is_err() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(100));
    }
    let env_home: &[(&str, &Path)] = &[("TOKENOMY_HOME", &home)];
    // 1. local file
    let (ok, out) = run(&["pull", model(SMOLLM2).to_str().unwrap()], env_home);
    assert!(ok, "{out}");
    assert!(home.join("models").join(SMOLLM2).is_file());
    // 2. a URL, with a wrong expected sha256: refused and not kept
    std::fs::remove_file(home.join("models").join(SMOLLM2)).unwrap();
    let url = format!("{endpoint}/org/repo/resolve/main/{SMOLLM2}");
    let (ok, out) = run(&["pull", &url, "--sha256", &"0".repeat(64)], env_home);
    assert!(!ok && out.contains("sha256 mismatch"), "{out}");
    assert!(!home.join("models").join(SMOLLM2).exists());
    // 2b. a file that is not a GGUF model: refused and not kept
    let not_a_model = serve_dir.join("notes.gguf");
    std::fs::write(&not_a_model, "just some text").unwrap();
    let (ok, out) = run(&["pull", &format!("{endpoint}/notes.gguf")], env_home);
    assert!(!ok && out.contains("not a GGUF model file"), "{out}");
    assert!(!home.join("models").join("notes.gguf").exists());
    // 2c. a server that sends no length and stops a quarter of the way (killed mid-transfer):
    // the body ends as if whole, and the file's own layout shows it was cut; not kept. And a
    // query never names the stored file. Then one that promised a length and broke off: an
    // error, and no partial file left.
    let bytes = std::fs::read(model(SMOLLM2)).unwrap();
    let length = format!("Content-Length: {}\r\n", bytes.len());
    for (path, head, part, says) in [("cut.gguf?x=../../y", "", 4, "arrived incomplete"), ("broken.gguf", length.as_str(), 3, "nothing was kept")] {
        let url = serve_once(&format!("/files/{path}"), format!("HTTP/1.1 200 OK\r\n{head}Connection: close\r\n\r\n"), bytes[..bytes.len() / part].to_vec());
        let (ok, out) = run(&["pull", &url], env_home);
        assert!(!ok && out.contains(says), "{out}");
        let models: Vec<_> = std::fs::read_dir(home.join("models")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert!(models.is_empty(), "nothing kept: {models:?}");
    }
    // 3. a Hugging Face path, through HF_ENDPOINT
    let mut cmd = Command::new(BIN);
    cmd.args(["pull", &format!("org/repo/{SMOLLM2}")]).env("TOKENOMY_HOME", &home).env("HF_ENDPOINT", &endpoint);
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(home.join("models").join(SMOLLM2).is_file());
    // and `models` lists it as downloaded
    let (ok, out) = run(&["models"], env_home);
    assert!(ok && out.lines().any(|l| l.starts_with("smollm2") && l.contains("downloaded") && !l.contains("not downloaded")), "{out}");
    let _ = server.kill();
    let _ = server.wait();
}

#[test]
fn qwen2_answers_a_chat() {
    let node = serve(&["--model", model(QWEN).to_str().unwrap()]);
    let (status, v) = chat(&node, "qwen2.5-coder-0.5b");
    assert_eq!(status, 200, "{v}");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text.contains("Paris"), "{text}");
}

#[test]
fn gemma3_needs_a_template_and_answers_with_one() {
    let node = serve(&["--model", model(GEMMA).to_str().unwrap()]);
    let (status, v) = chat(&node, "gemma3-270m");
    assert_eq!(status, 400, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("--chat-template"), "{v}");
    drop(node);
    let node = serve(&["--model", model(GEMMA).to_str().unwrap(), "--chat-template", "gemma"]);
    let (status, v) = chat(&node, "gemma3-270m");
    assert_eq!(status, 200, "{v}");
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() > 0, "{v}");
}

/// `--no-auth` serves the local user of `user.key`; a data dir that has none (it came to a
/// ledger set up before) refuses to start with `--no-auth` and says why, before loading a model.
#[test]
fn no_auth_without_a_local_user_refuses_to_start() {
    let dir = tempdir("noauth");
    let node = serve_in(&dir, &["--model", model(SMOLLM2).to_str().unwrap()], &[]);
    node.kill();
    // The admin key and the user key are gone: the ledger (here in the data dir) stays set up.
    std::fs::remove_file(dir.join("admin.key")).unwrap();
    std::fs::remove_file(dir.join("user.key")).unwrap();
    let err = serve_refuses(&dir, &["--no-auth"]);
    assert!(err.contains("--no-auth") && err.contains("user.key"), "{err}");
    assert!(dir.join("admin.key").exists(), "the data dir got an admin key of its own");
    assert!(!dir.join("user.key").exists(), "and no second local user");
}

/// A ledger that cannot be opened says why at start: the server's own reason (here a database
/// that does not exist; it used to say only "db error" and "retry shortly"), and a URL that is
/// not PostgreSQL's says what one looks like.
#[test]
fn a_ledger_that_cannot_be_opened_says_why() {
    let err = serve_refuses(&tempdir("badurl"), &["--database", "mysql://x@localhost/db"]);
    assert!(err.contains("not a PostgreSQL one") && err.contains("postgres://USER"), "{err}");
    let Some(url) = tokenomy_ledger::testing::stores().into_iter().flatten().next() else { return };
    let (server, _) = url.rsplit_once('/').unwrap();
    let err = serve_refuses(&tempdir("nodb"), &["--database", &format!("{server}/tokenomy_no_such_database")]);
    assert!(err.contains("tokenomy_no_such_database\" does not exist") && !err.contains("retry shortly"), "{err}");
}

/// A port already taken is said at once: before a first run sets up the data dir, and before
/// the models load.
#[test]
fn a_port_already_taken_is_said_before_the_data_dir_is_set_up() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = taken.local_addr().unwrap().to_string();
    let dir = tempdir("taken").join("data");
    let (ok, out) = run(&["serve", "--model", model(SMOLLM2).to_str().unwrap(), "--listen", &listen, "--data-dir", dir.to_str().unwrap()], &[]);
    assert!(!ok && out.contains(&format!("binding {listen}")), "{out}");
    assert!(!dir.exists(), "no data dir was set up");
}

/// `serve --model SmolLM2 ARGS` in `dir` must exit unsuccessfully within a minute (not serve):
/// returns what it printed on stderr.
fn serve_refuses(dir: &Path, args: &[&str]) -> String {
    let mut child = Command::new(BIN)
        .args(["serve", "--model", model(SMOLLM2).to_str().unwrap(), "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("serve {args:?} started instead of refusing");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success(), "serve {args:?} exited 0");
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    err
}

/// SIGTERM lets in-flight answers finish and the process exit 0; past `--drain-timeout-ms` an
/// answer still running is cut (`finish_reason: "abort"`) and charged for what it produced (its
/// stream ends with its usage and receipt); a second SIGTERM cuts the answers at once, charged
/// for what they produced, and a third stops the process at once, however long the answers
/// still running would take.
#[test]
fn sigterm_drains_a_second_cuts_and_a_third_stops_at_once() {
    let term = |node: &Node| {
        let ok = Command::new("kill").args(["-TERM", &node.child.id().to_string()]).status().unwrap().success();
        assert!(ok);
    };
    let stream_for = |node: &Node, max_tokens: u32| {
        let (base, key) = (node.base.clone(), node.user_key());
        std::thread::spawn(move || {
            let body = json!({"model": "smollm2", "max_tokens": max_tokens, "ignore_eos": true, "stream": true,
                "stream_options": {"include_usage": true}, "messages": [{"role": "user", "content": "Tell me a long story."}]});
            let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(300)).build().unwrap();
            client.post(format!("{base}/v1/chat/completions")).bearer_auth(key).json(&body).send().and_then(|r| r.text()).unwrap_or_default()
        })
    };
    // One signal: the 40-token answer finishes, whole, and the node exits 0.
    let mut node = serve(&["--model", model(SMOLLM2).to_str().unwrap()]);
    let short = stream_for(&node, 40);
    std::thread::sleep(Duration::from_millis(300));
    term(&node);
    assert!(short.join().unwrap().trim_end().ends_with("data: [DONE]"), "the answer in flight finished");
    let status = node.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    // One signal and a deadline: the 900-token answer is cut at it, charged for what it
    // produced, and the node exits 0.
    let mut node = serve(&["--model", model(SMOLLM2).to_str().unwrap(), "--drain-timeout-ms", "1000"]);
    let long = stream_for(&node, 900);
    std::thread::sleep(Duration::from_millis(500));
    term(&node);
    let status = node.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let text = long.join().unwrap();
    let last: Value = text.lines().filter_map(|l| l.strip_prefix("data: ")).filter(|d| *d != "[DONE]").last().map(|d| serde_json::from_str(d).unwrap()).unwrap();
    let produced = last["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((1..900).contains(&produced), "{last}");
    assert!(text.contains(r#""finish_reason":"abort""#), "a client can tell the answer was cut: {text}");
    assert!(last["receipt"]["amount_micros"].as_i64().unwrap() > 0, "charged for what it produced: {last}");
    // Two signals: 900-token answers (seconds more) are cut at the second, each charged for
    // what it produced (it used to stop the process there, their tokens served for nothing),
    // and the node exits 0 at once.
    let mut node = serve(&["--model", model(SMOLLM2).to_str().unwrap()]);
    let long: Vec<_> = (0..4).map(|_| stream_for(&node, 900)).collect();
    std::thread::sleep(Duration::from_millis(1500));
    term(&node);
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    term(&node);
    let status = node.child.wait().unwrap();
    assert!(t.elapsed() < Duration::from_secs(3) && status.success(), "{status:?} after {:?}", t.elapsed());
    let mut charged = 0;
    for l in long {
        // (Two run, two wait in the queue with nothing produced, nothing charged; on a busy
        // machine the second may still be reading its prompt.)
        let text = l.join().unwrap();
        let last: Value = text.lines().filter_map(|l| l.strip_prefix("data: ")).filter(|d| *d != "[DONE]").last().map(|d| serde_json::from_str(d).unwrap()).unwrap();
        assert!(text.contains(r#""finish_reason":"abort""#) && text.trim_end().ends_with("data: [DONE]"), "cut: {text}");
        let produced = last["usage"]["completion_tokens"].as_u64().unwrap();
        assert_eq!(last["receipt"]["amount_micros"].as_i64().is_some_and(|a| a > 0), produced > 0, "charged for what it produced: {last}");
        charged += usize::from(produced > 0);
    }
    assert!(charged >= 1, "the running answers were charged");
    // Three signals: the node is gone at once, with status 1 (it used to die of SIGSEGV 3
    // times in 10: `exit` ran llama.cpp's destructors under its decoding threads).
    let mut node = serve(&["--model", model(SMOLLM2).to_str().unwrap()]);
    let long: Vec<_> = (0..4).map(|_| stream_for(&node, 900)).collect();
    std::thread::sleep(Duration::from_millis(1500));
    term(&node);
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    term(&node);
    term(&node);
    let status = node.child.wait().unwrap();
    assert!(t.elapsed() < Duration::from_secs(3) && matches!(status.code(), Some(0 | 1)), "{status:?} after {:?}", t.elapsed());
    // No answer ran to its end: each was cut, by the hard stop (no `[DONE]`) or, when the
    // second signal's cut reached it before the third signal landed, with `abort`.
    for l in long {
        let text = l.join().unwrap();
        assert!(!text.contains("data: [DONE]") || text.contains(r#""finish_reason":"abort""#), "the answer was cut off: {text}");
    }
}

/// `--n-gpu-layers` asks for GPU offload; a build without a GPU backend (CI's: no `cuda`,
/// `vulkan` or `metal` feature) refuses to start with it rather than silently run on the CPU,
/// and says how to get one; `--n-gpu-layers 0` (the CPU) serves.
#[test]
#[cfg(not(any(feature = "cuda", feature = "vulkan", feature = "metal", feature = "dynamic-link")))]
fn gpu_layers_in_a_build_without_a_gpu_backend_refuse_to_start() {
    let err = serve_refuses(&tempdir("gpu"), &["--n-gpu-layers", "8"]);
    assert!(err.contains("--n-gpu-layers 8") && err.contains("--features cuda"), "{err}");
    let node = serve(&["--model", model(SMOLLM2).to_str().unwrap(), "--n-gpu-layers", "0"]);
    let (status, v) = chat(&node, "smollm2");
    assert_eq!(status, 200, "{v}");
}

/// Nodes of one PostgreSQL ledger: a receipt node a issued just before it was stopped (SIGTERM)
/// is served by node b once a is gone, and verifies with the file of the ledger's keys that b
/// lists (`tokenomy verify` picks a's key from it). Node a publishes only at its start and its
/// stop here (its upkeep's interval is an hour), so what b serves is what the stop published.
#[test]
fn a_stopped_node_leaves_its_receipts_to_the_others() {
    let Ok(server) = std::env::var("TOKENOMY_TEST_POSTGRES_URL") else {
        return eprintln!("SKIP PostgreSQL: TOKENOMY_TEST_POSTGRES_URL is not set");
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let url = rt.block_on(tokenomy_ledger::testing::fresh_database(&server, "tokenomy_cli_stopped_node"));
    let smollm2 = model(SMOLLM2);
    let args = |origin: &'static str| ["--model", smollm2.to_str().unwrap(), "--database", url.as_str(), "--origin", origin];
    let hourly = [("TOKENOMY_BILLING__CHECKPOINT_INTERVAL_MS", "3600000")];
    let (dir_a, dir_b) = (tempdir("stopped-a"), tempdir("stopped-b"));
    let mut a = serve_in(&dir_a, &args("stopped.test/a"), &hourly);
    let b = serve_in(&dir_b, &args("stopped.test/b"), &hourly);
    let key = a.user_key();
    let (status, reply) = chat(&a, "smollm2");
    assert_eq!(status, 200, "{reply}");
    let id = reply["receipt"]["id"].as_str().unwrap().to_string();
    assert!(Command::new("kill").args(["-TERM", &a.child.id().to_string()]).status().unwrap().success());
    assert!(a.child.wait().unwrap().success());
    let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
    let r = client.get(format!("{}/v1/receipts/{id}", b.base)).bearer_auth(&key).send().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let (bundle, keys) = (dir_b.join("r.json"), dir_b.join("ledger.pub"));
    std::fs::write(&bundle, r.text().unwrap()).unwrap();
    let listed = client.get(format!("{}/v1/node/keys", b.base)).send().unwrap().text().unwrap();
    assert!(listed.starts_with("stopped.test/b+") && listed.lines().count() == 2, "{listed}");
    std::fs::write(&keys, listed).unwrap();
    let (ok, out) = run(&["verify", bundle.to_str().unwrap(), "--key", keys.to_str().unwrap()], &[]);
    assert!(ok && out.contains("signed by stopped.test/a"), "{out}");
    let (ok, out) = run(&["verify", bundle.to_str().unwrap(), "--key", dir_b.join("node.pub").to_str().unwrap()], &[]);
    assert!(!ok && out.contains("not the trusted key"), "{out}");
}
