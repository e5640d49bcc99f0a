"""tokenomy vs llama.cpp's llama-server under concurrent load, in one run: same GGUF, same
threads, llama-server with -np equal to the stream count. Drives both with `tokenomy bench`
(shared-prefix and no-sharing workloads, fixed seed) and prints a Markdown table with ratios.

Usage:
  python bench/compare_servers.py --tokenomy target/debug/tokenomy \
      --llama-server target/llama-cpp-ref/build/bin/llama-server \
      --model ~/.tokenomy/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf [--model …] \
      [--threads 2] [--streams 8] [--requests-per-stream 2] [--max-tokens 48]
"""
import argparse
import json
import os
import subprocess
import tempfile

from localserver import start, stop


def bench(tokenomy, base, pid, workload, a):
    out = subprocess.run([tokenomy, "bench", "--url", base + "/v1", "--workload", workload, "--streams", str(a.streams),
                          "--requests-per-stream", str(a.requests_per_stream), "--max-tokens", str(a.max_tokens),
                          "--seed", "7", "--server-pid", str(pid), "--json"], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def run_server(argv_for_port, ready, tokenomy, a):
    proc, base = start(argv_for_port, ready, timeout_s=300)
    try:
        # warm-up: page the weights in, so neither server pays the first-touch cost in the run
        subprocess.run([tokenomy, "bench", "--url", base + "/v1", "--streams", "1", "--requests-per-stream", "1",
                        "--max-tokens", "4", "--seed", "99", "--workload", "no-sharing"], check=True, capture_output=True)
        return {w: bench(tokenomy, base, proc.pid, w, a) for w in ("shared-prefix", "no-sharing")}
    finally:
        stop(proc)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokenomy", required=True)
    p.add_argument("--llama-server", required=True)
    p.add_argument("--model", action="append", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--requests-per-stream", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--ctx-per-stream", type=int, default=1024)
    a = p.parse_args()
    rows = []
    for model in a.model:
        model = os.path.expanduser(model)
        name = os.path.basename(model)
        ls = run_server(lambda port: [a.llama_server, "-m", model, "-t", str(a.threads), "-np", str(a.streams),
                                      "-c", str(a.ctx_per_stream * a.streams), "--host", "127.0.0.1", "--port", str(port)],
                        "/health", a.tokenomy, a)
        tk = run_server(lambda port: [a.tokenomy, "serve", "--model", model, "--threads", str(a.threads), "--parallel", str(a.streams),
                                      "--ctx-size", str(a.ctx_per_stream), "--listen", f"127.0.0.1:{port}", "--no-auth",
                                      "--data-dir", tempfile.mkdtemp(prefix="tokenomy-bench-")],
                        "/ready", a.tokenomy, a)
        for w in ("shared-prefix", "no-sharing"):
            rows.append((name, w, ls[w], tk[w]))
    print(f"{a.streams} streams × {a.requests_per_stream} requests × {a.max_tokens} tokens (ignore_eos), {a.threads} threads, seed 7\n")
    print("| model | workload | llama-server tok/s | tokenomy tok/s | ratio | llama-server TTFT p50 ms | tokenomy TTFT p50 ms | ratio | TPOT p50 ms (ls / tk) | CPU-s per Mtok (ls / tk) | errors (ls / tk) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, w, ls, tk in rows:
        print(f"| {name} | {w} | {ls['completion_tok_per_s']:.1f} | {tk['completion_tok_per_s']:.1f} | "
              f"{tk['completion_tok_per_s'] / ls['completion_tok_per_s']:.2f} | {ls['ttft_ms_p50']:.0f} | {tk['ttft_ms_p50']:.0f} | "
              f"{tk['ttft_ms_p50'] / ls['ttft_ms_p50']:.2f} | {ls['tpot_ms_p50']:.1f} / {tk['tpot_ms_p50']:.1f} | "
              f"{ls['cpu_s_per_mtok']:.0f} / {tk['cpu_s_per_mtok']:.0f} | {ls['errors']} / {tk['errors']} |")


if __name__ == "__main__":
    main()
