"""tokenomy vs llama.cpp's llama-server under concurrent load, in one run: same GGUF, same
threads, llama-server with -np equal to the stream count. Drives both with `tokenomy bench`
(shared-prefix and no-sharing workloads, fixed seed) and prints a Markdown table with ratios.

Usage:
  python bench/compare_servers.py --tokenomy target/release/tokenomy \
      --llama-server target/llama-cpp-ref/build/bin/llama-server \
      --model ~/.tokenomy/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf [--model …] \
      [--threads 2] [--streams 8] [--requests-per-stream 2] [--max-tokens 48] [--rounds 3] \
      [--json-out rounds.json] [--gpu-layers N]

Machines here drift by tens of per cent within minutes, so each model is measured in rounds
(llama-server, then tokenomy, repeated) and the ratios are medians of per-round ratios.
After the table it prints issue 5's targets with the exact ratios (the table rounds them) and
whether each is met; `--json-out` keeps every round's raw `tokenomy bench` report.
"""
import argparse
import json
import os
import statistics
import subprocess
import tempfile

from localserver import start, stop


def gpu(a, flag):
    """`flag N` when --gpu-layers was given (older tokenomy binaries have no such flag)."""
    return [] if a.gpu_layers is None else [flag, str(a.gpu_layers)]


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
    p.add_argument("--rounds", type=int, default=3, help="llama-server then tokenomy, this many times per model")
    p.add_argument("--json-out", help="write every round's raw reports here")
    p.add_argument("--gpu-layers", type=int, help="layers on the GPU, for builds with a GPU backend (both servers)")
    a = p.parse_args()
    med = statistics.median
    rows = []
    for model in a.model:
        model = os.path.expanduser(model)
        name = os.path.basename(model)
        rounds = []
        for _ in range(a.rounds):
            ls = run_server(lambda port: [a.llama_server, "-m", model, "-t", str(a.threads), "-np", str(a.streams),
                                          "-c", str(a.ctx_per_stream * a.streams), *gpu(a, "-ngl"), "--host", "127.0.0.1", "--port", str(port)],
                            "/health", a.tokenomy, a)
            tk = run_server(lambda port: [a.tokenomy, "serve", "--model", model, "--threads", str(a.threads), "--parallel", str(a.streams),
                                          "--ctx-size", str(a.ctx_per_stream), *gpu(a, "--n-gpu-layers"), "--listen", f"127.0.0.1:{port}", "--no-auth",
                                          "--data-dir", tempfile.mkdtemp(prefix="tokenomy-bench-")],
                            "/ready", a.tokenomy, a)
            rounds.append((ls, tk))
        for w in ("shared-prefix", "no-sharing"):
            pairs = [(ls[w], tk[w]) for ls, tk in rounds]
            rows.append((name, w, pairs))
    print(f"{a.streams} streams × {a.requests_per_stream} requests × {a.max_tokens} tokens (ignore_eos), {a.threads} threads, seed 7; "
          f"{a.rounds} rounds per model (llama-server, then tokenomy); figures are medians over rounds, ratios the median "
          f"of the per-round ratios\n")
    print("| model | workload | llama-server tok/s | tokenomy tok/s | ratio | llama-server TTFT p50 ms | tokenomy TTFT p50 ms | ratio | first requests' TTFT p50 ms (ls / tk, ratio) | TPOT p50 ms (ls / tk) | CPU-s per Mtok (ls / tk) | errors (ls / tk) | per-round tok/s ratios |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for name, w, pairs in rows:
        m = lambda side, key: med([p[side][key] for p in pairs])
        tps = [p[1]["completion_tok_per_s"] / p[0]["completion_tok_per_s"] for p in pairs]
        ttft = [p[1]["ttft_ms_p50"] / p[0]["ttft_ms_p50"] for p in pairs]
        first = [p[1]["ttft_ms_p50_first"] / p[0]["ttft_ms_p50_first"] for p in pairs]
        errors = (sum(p[0]["errors"] for p in pairs), sum(p[1]["errors"] for p in pairs))
        print(f"| {name} | {w} | {m(0, 'completion_tok_per_s'):.1f} | {m(1, 'completion_tok_per_s'):.1f} | {med(tps):.2f} | "
              f"{m(0, 'ttft_ms_p50'):.0f} | {m(1, 'ttft_ms_p50'):.0f} | {med(ttft):.2f} | "
              f"{m(0, 'ttft_ms_p50_first'):.0f} / {m(1, 'ttft_ms_p50_first'):.0f}, {med(first):.2f} | "
              f"{m(0, 'tpot_ms_p50'):.1f} / {m(1, 'tpot_ms_p50'):.1f} | {m(0, 'cpu_s_per_mtok'):.0f} / {m(1, 'cpu_s_per_mtok'):.0f} | "
              f"{errors[0]} / {errors[1]} | {' '.join(f'{r:.2f}' for r in tps)} |")
    print("\nTargets (issue 5), exact ratios:")
    for name, w, pairs in rows:
        for line, ok in targets(w, pairs):
            print(f"- {name} {w}: {line}: {'met' if ok else 'NOT met'}")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump([{"model": name, "workload": w, "rounds": [{"llama_server": ls, "tokenomy": tk} for ls, tk in pairs]}
                       for name, w, pairs in rows], f, indent=1)


def targets(workload, pairs):
    """Issue 5's lines for one workload: (text with the exact median ratio, met)."""
    med = statistics.median
    tps = med(p[1]["completion_tok_per_s"] / p[0]["completion_tok_per_s"] for p in pairs)
    errors = sum(p[1]["errors"] for p in pairs)
    if workload == "shared-prefix":
        ttft = med(p[1]["ttft_ms_p50"] / p[0]["ttft_ms_p50"] for p in pairs)
        return [(f"tok/s {tps:.4f}x (>= 1.3)", tps >= 1.3), (f"TTFT p50 {ttft:.4f}x (<= 0.5)", ttft <= 0.5),
                (f"tokenomy errors {errors} (0)", errors == 0)]
    return [(f"tok/s {tps:.4f}x (>= 1.0)", tps >= 1.0), (f"tokenomy errors {errors} (0)", errors == 0)]


if __name__ == "__main__":
    main()
