"""Records llama.cpp's own embeddings as test data: runs `llama-server --embeddings --pooling mean`
on a GGUF and saves, for a few texts, their token ids and the vector its `/v1/embeddings`
returns (L2-normalised, as OpenAI's). The tests hold tokenomy's `/v1/embeddings` to these
vectors within a tolerance (CPUs round differently; see tests/it/embeddings.rs).

Usage: python bench/record_llama_server_embeddings.py --server target/llama-cpp-ref/build/bin/llama-server \
           --model ~/.tokenomy/models/SmolLM2-135M-Instruct.Q4_1.gguf --out crates/tokenomy-api/tests/data/llama_server_embeddings_smollm2.json
"""
import argparse

from localserver import build_info, post_json as post, start, stop, write_json

TEXTS = ["The cat sits on the mat.", "Quarterly revenue grew five percent.",
         "How do I sort a list in Python?", "  leading spaces and émojis 🚀 and 数字 123"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    proc, base = start(lambda port: [a.server, "-m", a.model, "--embeddings", "--pooling", "mean", "-np", "1", "-t", "2",
                                     "-c", "1024", "-ub", "1024", "--port", str(port), "--host", "127.0.0.1", "--no-webui"],
                       "/health")
    try:
        version = build_info(base)
        texts = []
        for t in TEXTS:
            tokens = post(base, "/tokenize", {"content": t, "add_special": True})["tokens"]
            r = post(base, "/v1/embeddings", {"input": t, "encoding_format": "float"})
            texts.append({"text": t, "token_ids": tokens, "embedding": r["data"][0]["embedding"],
                          "prompt_tokens": r["usage"]["prompt_tokens"]})
        out = {"produced_by": f"bench/record_llama_server_embeddings.py with llama-server {version} (llama-cpp-python sdist), "
                              "--embeddings --pooling mean -np 1 -t 2 -c 1024 -ub 1024",
               "model_file": a.model.rsplit("/", 1)[-1], "texts": texts}
        write_json(a.out, out)
    finally:
        stop(proc)


if __name__ == "__main__":
    main()
