"""Is a sequence's score affected by what else is in the KV cache, or only by where its cells are?

Scores one passage (echo + logprobs, max_tokens 0) on fresh two-slot tokenomy nodes: once on an
empty cache, and once each after a different random 227-token prompt A or B was served first.
Prints the largest logprob difference of each pair. "after A vs after B" = 0 while both differ
from the fresh score means the difference follows cell placement, not the other text's content.

Usage: python bench/kv_placement_probe.py --tokenomy target/debug/tokenomy [--model PATH.gguf]
"""
import argparse
import json
import os
import urllib.request
import random
import tempfile

from localserver import post_json, start, stop


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokenomy", required=True)
    p.add_argument("--model", default=os.path.expanduser("~/.tokenomy/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    a = p.parse_args()
    here = os.path.dirname(os.path.abspath(__file__))
    words = open(os.path.join(here, "..", "crates/tokenomy-api/tests/data/apache-2.0-excerpt.txt")).read().split()
    n = len(words) // 8
    passage = " ".join(words[n:2 * n])

    def score_after(prefix_ids):
        proc, base = start(lambda port: [a.tokenomy, "serve", "--model", a.model, "--listen", f"127.0.0.1:{port}", "--threads", "2",
                                         "--parallel", "2", "--ctx-size", "2048", "--no-auth",
                                         "--data-dir", tempfile.mkdtemp(prefix="tokenomy-probe-")], "/ready")
        try:
            model = json.load(urllib.request.urlopen(base + "/v1/models"))["data"][0]["id"]
            if prefix_ids:
                post_json(base, "/v1/completions", {"model": model, "prompt": prefix_ids, "max_tokens": 1, "temperature": 0})
            v = post_json(base, "/v1/completions", {"model": model, "prompt": passage, "echo": True, "logprobs": 1, "max_tokens": 0})
            return v["choices"][0]["logprobs"]["token_logprobs"][1:]
        finally:
            stop(proc)

    rng = random.Random(1)
    prefix_a = [rng.randrange(1000, 40000) for _ in range(227)]
    prefix_b = [rng.randrange(1000, 40000) for _ in range(227)]
    fresh, after_a, after_b = score_after(None), score_after(prefix_a), score_after(prefix_b)
    diff = lambda x, y: max(abs(p - q) for p, q in zip(x, y))
    print(f"after A vs fresh:   {diff(after_a, fresh):.4f}")
    print(f"after B vs fresh:   {diff(after_b, fresh):.4f}")
    print(f"after A vs after B: {diff(after_a, after_b):.4f}")


if __name__ == "__main__":
    main()
