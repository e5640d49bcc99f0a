"""Single-stream prefill and decode speed through tokenomy's HTTP API, next to llama-bench on
the same GGUF and thread count, measured in one run. Prints a Markdown table with ratios.

Usage: python bench/single_stream.py --tokenomy target/release/tokenomy \
           --llama-bench target/llama-cpp-ref/build/bin/llama-bench --model PATH.gguf [--threads 2] [--rounds 7] [--gpu-layers N]
           [--depth D]   (decode after a prompt of D tokens, against llama-bench -d D: a long conversation's speed)
"""
import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

from localserver import post, start, stop


def llama_bench(binary, model, threads, pp, tg, reps, gpu_layers, depth):
    # at a depth only decode is compared (our prefill is measured from an empty context)
    pp = 0 if depth else pp
    out = subprocess.run([binary, "-m", model, "-t", str(threads), "-p", str(pp), "-n", str(tg), "-r", str(reps), "-o", "json",
                          *([] if gpu_layers is None else ["-ngl", str(gpu_layers)]), *(["-d", str(depth)] if depth else [])],
                         check=True, capture_output=True, text=True).stdout
    rows = json.loads(out)
    pp_ts = next((r["avg_ts"] for r in rows if r["n_prompt"] == pp and r["n_gen"] == 0), float("nan"))
    tg_ts = next(r["avg_ts"] for r in rows if r["n_gen"] == tg and r["n_prompt"] == 0)
    return pp_ts, tg_ts


def tokenomy_round(base, name, rng, pp, tg, depth):
    """One prefill measurement and one decode measurement (after `depth` prompt tokens) through
    the HTTP API."""
    # random token ids: no prefix-cache reuse between rounds
    prompt = [rng.randrange(1000, 20000) for _ in range(pp)]
    t0 = time.perf_counter()
    r = json.load(post(base, "/v1/completions", {"model": name, "prompt": prompt, "max_tokens": 1, "temperature": 0}))
    t1 = time.perf_counter()
    assert r["usage"]["prompt_tokens"] == pp, r["usage"]
    assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    short = [rng.randrange(1000, 20000) for _ in range(max(8, depth))]
    resp = post(base, "/v1/completions", {"model": name, "prompt": short, "max_tokens": tg, "temperature": 0,
                                          "ignore_eos": True, "stream": True, "logprobs": None})
    stamps = []
    for line in resp:
        line = line.decode().strip()
        if line.startswith("data: {") and '"text":"' in line and '"finish_reason":null' in line:
            stamps.append(time.perf_counter())
    assert len(stamps) > 2, "no streamed tokens"
    return pp / (t1 - t0), (len(stamps) - 1) / (stamps[-1] - stamps[0])


def compare(tokenomy, llama_bench_bin, model, threads, pp, tg, rounds, gpu_layers, depth):
    """Interleaves llama-bench and tokenomy round by round (A B A B …), so that both see the
    same machine load; returns per-round figures and ratios."""
    ctx = str(max(2048, pp + tg + 8, depth + tg + 8))
    proc, base = start(lambda port: [tokenomy, "serve", "--model", model, "--listen", f"127.0.0.1:{port}",
                                     "--threads", str(threads), "--parallel", "1", "--ctx-size", ctx,
                                     *([] if gpu_layers is None else ["--n-gpu-layers", str(gpu_layers)]),
                                     "--no-auth", "--data-dir", tempfile.mkdtemp(prefix="tokenomy-bench-")], "/ready")
    try:
        name = json.load(urllib.request.urlopen(base + "/v1/models"))["data"][0]["id"]
        rng = random.Random(7)
        tokenomy_round(base, name, rng, pp, tg, depth)  # warm-up
        rows = []
        for _ in range(rounds):
            pp_ref, tg_ref = llama_bench(llama_bench_bin, model, threads, pp, tg, 1, gpu_layers, depth)
            pp_ours, tg_ours = tokenomy_round(base, name, rng, pp, tg, depth)
            rows.append((pp_ref, pp_ours, tg_ref, tg_ours))
        return rows
    finally:
        stop(proc)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenomy", required=True)
    ap.add_argument("--llama-bench", required=True)
    ap.add_argument("--model", action="append", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pp", type=int, default=512)
    ap.add_argument("--tg", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--gpu-layers", type=int, help="layers on the GPU, for builds with a GPU backend (both sides)")
    ap.add_argument("--depth", type=int, default=0, help="tokens in context before decoding (llama-bench -d)")
    a = ap.parse_args()
    med = statistics.median
    print(f"Interleaved rounds (llama-bench -r 1, then tokenomy), medians of {a.rounds}; ratio = median of per-round ratios.\n")
    at = f" @ d{a.depth}" if a.depth else ""
    pp_head = "" if a.depth else f" llama-bench pp{a.pp} tok/s | tokenomy prefill tok/s | ratio |"
    print(f"| model |{pp_head} llama-bench tg{a.tg}{at} tok/s | tokenomy decode tok/s | ratio |")
    print("|---|" + ("" if a.depth else "---:|---:|---:|") + "---:|---:|---:|")
    verdicts = []
    for m in a.model:
        m = os.path.expanduser(m)
        rows = compare(a.tokenomy, a.llama_bench, m, a.threads, a.pp, a.tg, a.rounds, a.gpu_layers, a.depth)
        cols = list(zip(*rows))
        pp_ratio = med([r[1] / r[0] for r in rows])
        tg_ratio = med([r[3] / r[2] for r in rows])
        pp_cells = "" if a.depth else f" {med(cols[0]):.1f} | {med(cols[1]):.1f} | {pp_ratio:.2f} |"
        print(f"| {os.path.basename(m)} |{pp_cells} {med(cols[2]):.1f} | {med(cols[3]):.1f} | {tg_ratio:.2f} |")
        sys.stdout.flush()
        ok = tg_ratio >= 0.95
        verdicts.append(f"- {os.path.basename(m)}: decode {tg_ratio:.4f}x llama-bench tg{a.tg}{at} (target >= 0.95): "
                        f"{'met' if ok else 'NOT met'}")
    print("\nIssue 5's single-stream line (exact median ratios):")
    print("\n".join(verdicts))


if __name__ == "__main__":
    main()
