"""Teacher forcing through tokenomy's HTTP API: eight passages of the Apache licence excerpt
scored (echo + logprobs, max_tokens 0) on a one-slot node one after another, then on an
eight-slot node all at once; prints how often the top-1 token agrees and how many
log-probabilities are bit-identical. The black-box form of the engine test
`batched_scoring_agrees_with_solo_scoring_under_teacher_forcing`, for builds the suite does
not run (a GPU backend).

Usage: python bench/teacher_forcing.py --tokenomy BIN --model PATH.gguf [--gpu-layers N]
"""
import argparse
import concurrent.futures
import json
import os
import tempfile
import urllib.request

from localserver import post, start, stop

EXCERPT = os.path.join(os.path.dirname(__file__), "..", "crates", "tokenomy-api", "tests", "data", "apache-2.0-excerpt.txt")


def top1(base, name, text):
    r = json.load(post(base, "/v1/completions", {"model": name, "prompt": text, "echo": True, "logprobs": 1, "max_tokens": 0}))
    return [max(m.items(), key=lambda kv: kv[1]) for m in r["choices"][0]["logprobs"]["top_logprobs"][1:]]


def node(a, slots):
    return start(lambda port: [a.tokenomy, "serve", "--model", a.model, "--parallel", str(slots), "--ctx-size", "1024",
                               *([] if a.gpu_layers is None else ["--n-gpu-layers", str(a.gpu_layers)]), "--no-auth", "--listen", f"127.0.0.1:{port}",
                               "--data-dir", tempfile.mkdtemp(prefix="tokenomy-tf-")], "/ready")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokenomy", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--gpu-layers", type=int)
    a = p.parse_args()
    words = open(EXCERPT).read().split()
    texts = [" ".join(words[i:i + len(words) // 8]) for i in range(0, len(words) // 8 * 8, len(words) // 8)]
    proc, base = node(a, 1)
    try:
        name = json.load(urllib.request.urlopen(base + "/v1/models"))["data"][0]["id"]
        alone = [top1(base, name, t) for t in texts]
    finally:
        stop(proc)
    proc, base = node(a, 8)
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            together = list(pool.map(lambda t: top1(base, name, t), texts))
    finally:
        stop(proc)
    same = exact = total = 0
    for x, y in zip(alone, together):
        assert len(x) == len(y), "the same text tokenizes the same"
        same += sum(1 for u, v in zip(x, y) if u[0] == v[0])
        exact += sum(1 for u, v in zip(x, y) if u == v)
        total += len(x)
    print(f"teacher forcing ({a.gpu_layers or 0} GPU layers): top-1 agreement {same}/{total} = {same / total:.4f}; "
          f"log-probabilities bit-identical at {exact}")


if __name__ == "__main__":
    main()
