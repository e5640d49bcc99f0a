"""Single-stream prefill and decode speed through tokenomy's HTTP API, next to llama-bench on
the same GGUF and thread count, measured in one run. Prints a Markdown table with ratios.

Usage: python bench/single_stream.py --tokenomy target/debug/tokenomy \
           --llama-bench target/llama-cpp-ref/build/bin/llama-bench --model PATH.gguf [--threads 2] [--runs 5]
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


def llama_bench(binary, model, threads, pp, tg):
    out = subprocess.run([binary, "-m", model, "-t", str(threads), "-p", str(pp), "-n", str(tg), "-r", "3", "-o", "json"],
                         check=True, capture_output=True, text=True).stdout
    rows = json.loads(out)
    pp_ts = next(r["avg_ts"] for r in rows if r["n_prompt"] == pp and r["n_gen"] == 0)
    tg_ts = next(r["avg_ts"] for r in rows if r["n_gen"] == tg and r["n_prompt"] == 0)
    return pp_ts, tg_ts


def tokenomy_runs(binary, model, threads, pp, tg, runs):
    ctx = str(max(2048, pp + tg + 8))
    proc, base = start(lambda port: [binary, "serve", "--model", model, "--listen", f"127.0.0.1:{port}",
                                     "--threads", str(threads), "--parallel", "1", "--ctx-size", ctx,
                                     "--no-auth", "--data-dir", tempfile.mkdtemp(prefix="tokenomy-bench-")], "/ready")
    try:
        name = json.load(urllib.request.urlopen(base + "/v1/models"))["data"][0]["id"]
        rng = random.Random(7)
        prefill, decode = [], []
        for i in range(runs + 1):
            # random token ids: no prefix-cache reuse between runs
            prompt = [rng.randrange(1000, 20000) for _ in range(pp)]
            t0 = time.perf_counter()
            r = json.load(post(base, "/v1/completions", {"model": name, "prompt": prompt, "max_tokens": 1, "temperature": 0}))
            t1 = time.perf_counter()
            assert r["usage"]["prompt_tokens"] == pp, r["usage"]
            assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
            short = [rng.randrange(1000, 20000) for _ in range(8)]
            resp = post(base, "/v1/completions", {"model": name, "prompt": short, "max_tokens": tg, "temperature": 0,
                                                  "ignore_eos": True, "stream": True, "logprobs": None})
            stamps = []
            for line in resp:
                line = line.decode().strip()
                if line.startswith("data: {") and '"text":"' in line and '"finish_reason":null' in line:
                    stamps.append(time.perf_counter())
            if i == 0:
                continue  # warm-up
            prefill.append(pp / (t1 - t0))
            if len(stamps) > 2:
                decode.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
        return statistics.median(prefill), statistics.median(decode), len(prefill)
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
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    print(f"| model | llama-bench pp{a.pp} tok/s | tokenomy prefill tok/s | ratio | llama-bench tg{a.tg} tok/s | tokenomy decode tok/s | ratio |")
    print("|---|---|---|---|---|---|---|")
    for m in a.model:
        pp_ref, tg_ref = llama_bench(a.llama_bench, m, a.threads, a.pp, a.tg)
        pp_ours, tg_ours, n = tokenomy_runs(a.tokenomy, m, a.threads, a.pp, a.tg, a.runs)
        print(f"| {os.path.basename(m)} | {pp_ref:.1f} | {pp_ours:.1f} (median of {n}) | {pp_ours / pp_ref:.2f} | {tg_ref:.1f} | {tg_ours:.1f} | {tg_ours / tg_ref:.2f} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
