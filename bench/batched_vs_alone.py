"""Greedy answers of requests run together against the same requests run one at a time, through
any OpenAI-compatible server: the black-box form of the engine's batching test, for builds the
test suite does not run (a GPU backend, say). Prints, per request, whether text and usage agree,
and where the first differing character is.

Usage: python bench/batched_vs_alone.py --url http://127.0.0.1:8080/v1 --model smollm2 \
           [--requests 8] [--max-tokens 64] [--key KEY]

The requests run alone first, so the batched ones find their prompts in the server's prefix
cache: what is compared is mostly batched decoding. Exits 1 if a request failed. Differences are reported, not judged: batched kernels of a GPU
backend may round differently from solo ones (see docs/benchmarks.md).
"""
import argparse
import concurrent.futures
import json
import sys
import urllib.request

TOPICS = ["the water cycle", "how a compiler works", "the history of Rome", "photosynthesis", "prime numbers",
          "the French Revolution", "black holes", "how vaccines work", "plate tectonics", "the internet",
          "bees and pollination", "the printing press", "volcanoes", "how batteries store energy", "jazz music",
          "the immune system"]


def ask(a, i):
    body = {"model": a.model, "temperature": 0, "max_tokens": a.max_tokens, "messages": [
        {"role": "system", "content": "You are a helpful assistant. Answer in plain prose."},
        {"role": "user", "content": f"Explain {TOPICS[i % len(TOPICS)]} to a curious twelve-year-old."}]}
    headers = {"content-type": "application/json"}
    if a.key:
        headers["authorization"] = f"Bearer {a.key}"
    req = urllib.request.Request(a.url + "/chat/completions", data=json.dumps(body).encode(), headers=headers)
    r = json.load(urllib.request.urlopen(req, timeout=600))
    u = r["usage"]
    return r["choices"][0]["message"]["content"], (u["prompt_tokens"], u["completion_tokens"])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--key")
    a = p.parse_args()
    alone = [ask(a, i) for i in range(a.requests)]
    with concurrent.futures.ThreadPoolExecutor(a.requests) as pool:
        together = list(pool.map(lambda i: ask(a, i), range(a.requests)))
    same = 0
    for i, ((t1, u1), (t2, u2)) in enumerate(zip(alone, together)):
        if t1 == t2 and u1 == u2:
            same += 1
            print(f"request {i}: same ({u1[1]} completion tokens)")
        else:
            at = next((k for k, (x, y) in enumerate(zip(t1, t2)) if x != y), min(len(t1), len(t2)))
            print(f"request {i}: DIFFERENT from character {at} of {len(t1)} (usage alone {u1}, together {u2})")
            print(f"  alone:    {t1[max(0, at - 40):at + 40]!r}\n  together: {t2[max(0, at - 40):at + 40]!r}")
    print(f"{same} of {a.requests} greedy answers identical run together and run alone")
    print(f"first answer: {alone[0][0]!r}")


if __name__ == "__main__":
    try:
        main()
    except OSError as e:
        print(f"request failed: {e}", file=sys.stderr)
        sys.exit(1)
