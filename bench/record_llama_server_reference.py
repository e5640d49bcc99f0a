"""Records llama.cpp's own answers as test data: runs `llama-server --jinja` on a GGUF and saves,
for a few chats, the rendered prompt (/apply-template), its token ids (/tokenize) and the
greedy answer with its usage (/v1/chat/completions, temperature 0). The tests compare
tokenomy against this file token for token.

Usage: python bench/record_llama_server_reference.py --server target/llama-cpp-ref/build/bin/llama-server \
           --model ~/.tokenomy/models/SmolLM2-135M-Instruct.Q4_1.gguf --out crates/tokenomy-api/tests/data/llama_server_smollm2.json
"""
import argparse

from localserver import build_info, post_json as post, start, stop, write_json

CHATS = [
    [{"role": "system", "content": "You are a concise assistant."}, {"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "List three primary colours."},
     {"role": "assistant", "content": "Red, blue and yellow."}, {"role": "user", "content": "And the secondary ones?"}],
    [{"role": "user", "content": "Explain in one sentence why the sky is blue."}],
]
TEXTS = ["Hello, world!", "The quick brown fox jumps over the lazy dog.", "  leading spaces and émojis 🚀 and 数字 123"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-tokens", type=int, default=48)
    a = ap.parse_args()
    proc, base = start(lambda port: [a.server, "-m", a.model, "--jinja", "-np", "1", "-t", "2", "-c", "2048",
                                     "--port", str(port), "--host", "127.0.0.1", "--no-webui"], "/health")
    try:
        version = build_info(base)
        chats = []
        for messages in CHATS:
            prompt = post(base, "/apply-template", {"messages": messages})["prompt"]
            tokens = post(base, "/tokenize", {"content": prompt, "add_special": True, "parse_special": True})["tokens"]
            r = post(base, "/v1/chat/completions", {"messages": messages, "temperature": 0, "max_tokens": a.max_tokens,
                                                    "cache_prompt": False})
            chats.append({"messages": messages, "prompt": prompt, "prompt_token_ids": tokens,
                          "content": r["choices"][0]["message"]["content"], "finish_reason": r["choices"][0]["finish_reason"],
                          "usage": {k: r["usage"][k] for k in ("prompt_tokens", "completion_tokens")}})
        texts = [{"text": t, "token_ids": post(base, "/tokenize", {"content": t, "add_special": True, "parse_special": True})["tokens"]}
                 for t in TEXTS]
        out = {"produced_by": f"bench/record_llama_server_reference.py with llama-server {version} (llama-cpp-python sdist), --jinja -np 1 -t 2 -c 2048",
               "model_file": a.model.rsplit("/", 1)[-1], "max_tokens": a.max_tokens, "chats": chats, "texts": texts}
        write_json(a.out, out)
    finally:
        stop(proc)


if __name__ == "__main__":
    main()
