//! `tokenomy bench` against a real node: every request is answered and counted, the report
//! has its figures, and the shared-prefix workload's requests share their system prompt (the
//! node reports the reuse as cached tokens in its metrics).

use serde_json::Value;

use crate::{model, run, serve, SMOLLM2};

#[test]
fn bench_drives_a_node_and_reports_its_figures() {
    let m = model(SMOLLM2);
    let node = serve(&["--model", m.to_str().unwrap(), "--no-auth"]);
    let url = format!("{}/v1", node.base);
    let (ok, out) = run(
        &["bench", "--url", &url, "--streams", "2", "--requests-per-stream", "2", "--max-tokens", "3", "--workload", "shared-prefix", "--json"],
        &[],
    );
    assert!(ok, "{out}");
    let r: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("no JSON ({e}): {out}"));
    assert_eq!((r["requests"].as_u64(), r["errors"].as_u64()), (Some(4), Some(0)), "{r}");
    // ignore_eos: every request produces exactly max_tokens
    assert_eq!(r["completion_tokens"].as_u64(), Some(12), "{r}");
    let each: Vec<f64> = r["ttft_ms_each"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert_eq!(each.len(), 4);
    let firsts = [each[0], each[2]];
    let p50_first = r["ttft_ms_p50_first"].as_f64().unwrap();
    assert!(firsts.contains(&p50_first), "{p50_first} is not a first request's TTFT: {each:?}");
    for key in ["completion_tok_per_s", "ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50", "wall_s"] {
        assert!(r[key].as_f64().is_some_and(|v| v > 0.0), "{key}: {r}");
    }
    let metrics = reqwest::blocking::get(format!("{}/metrics", node.base)).unwrap().text().unwrap();
    let cached: f64 = metrics
        .lines()
        .find(|l| l.starts_with("tokenomy_prompt_cached_tokens_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no cached-token counter in /metrics:\n{metrics}"));
    assert!(cached > 20.0, "the shared system prompt was not reused: {cached} cached tokens");

    let (ok, out) = run(&["bench", "--url", &url, "--streams", "0"], &[]);
    assert!(!ok && out.contains("--streams"), "{out}");
    // A node that wants a key, asked without one: every request fails, and so does the run.
    drop(node);
    let keyed = serve(&["--model", m.to_str().unwrap()]);
    let (ok, out) = run(&["bench", "--url", &format!("{}/v1", keyed.base), "--streams", "1", "--requests-per-stream", "1", "--max-tokens", "2"], &[]);
    assert!(!ok && out.contains("every request failed") && out.contains("TOKENOMY_API_KEY"), "{out}");
}
