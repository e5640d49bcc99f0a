//! The engine's cut of a prompt at special tokens against llama.cpp's own, measured in the same
//! run on the same text: a ChatML prompt of N one-message turns (2 N turn markers), each
//! message distinct (`a0`, `a1`, …), so no fragment is tokenized from memory.
//!
//! ```sh
//! cargo build --workspace --examples && target/debug/examples/bench_tokenize [MODEL.gguf]
//! ```
//! (default: `~/.tokenomy/models/SmolLM2-135M-Instruct.Q4_1.gguf`, whose template is ChatML).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokenomy_core::Backend;
use tokenomy_engine::{Engine, ModelConfig};

const RUNS: usize = 3;

fn main() {
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
    let path = std::env::args().nth(1).map(PathBuf::from).unwrap_or_else(|| home.join(".tokenomy/models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    let mut config = ModelConfig::new("m", &path);
    config.slots = 1;
    config.ctx_tokens_max = Some(256);
    let engine = Engine::load(&[config]).expect("the model loads");
    println!("model: {}", path.display());
    println!("| messages | tokens | llama.cpp ms (median of {RUNS}) | engine ms | llama.cpp / engine |");
    println!("| ---: | ---: | ---: | ---: | ---: |");
    for messages in [1_000, 3_000, 10_000] {
        let text: String = (0..messages).map(|i| format!("<|im_start|>user\na{i}<|im_end|>\n")).collect();
        let (theirs_ms, theirs) = median_ms(|| engine.tokenize_by_llama_cpp("m", &text).unwrap());
        let (ours_ms, ours) = median_ms(|| engine.tokenize("m", &text, true).unwrap());
        assert_eq!(ours, theirs, "the engine's tokens differ from llama.cpp's");
        println!("| {messages} | {} | {theirs_ms:.1} | {ours_ms:.1} | {:.1} |", ours.len(), theirs_ms / ours_ms);
    }
}

/// The median wall time of `RUNS` calls of `f`, in milliseconds, and its last result.
fn median_ms<T>(mut f: impl FnMut() -> T) -> (f64, T) {
    let mut times: Vec<Duration> = Vec::new();
    let mut last = None;
    for _ in 0..RUNS {
        let t = Instant::now();
        last = Some(f());
        times.push(t.elapsed());
    }
    times.sort();
    (times[RUNS / 2].as_secs_f64() * 1e3, last.expect("RUNS > 0"))
}
