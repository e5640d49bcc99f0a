#!/usr/bin/env bash
# Builds llama.cpp's own tools (llama-bench, llama-server, llama-perplexity) from the
# llama-cpp-python sdist on PyPI, which vendors llama.cpp. They are the reference that
# benchmarks and recorded outputs are compared against. Nothing of it is committed.
# Usage: scripts/build-llama-cpp-reference.sh [OUT_DIR]   (default: target/llama-cpp-ref; tools in OUT_DIR/build/bin)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/llama-cpp-ref}
bin=$out/build/bin
if [ -x "$bin/llama-bench" ] && [ -x "$bin/llama-server" ] && [ -x "$bin/llama-perplexity" ]; then echo "$bin"; exit 0; fi
mkdir -p "$out"
src=$out/src
if [ ! -d "$src/vendor/llama.cpp" ]; then
  python3 -m pip download --quiet --no-deps --no-binary=llama-cpp-python -d "$out/sdist" llama-cpp-python >&2
  rm -rf "$src"; mkdir -p "$src"
  tar -xzf "$out"/sdist/llama_cpp_python-*.tar.gz -C "$src" --strip-components=1
fi
# No AMX, as in tokenomy's own build (.cargo/config.toml says why).
flags=""
[ "$(uname -m)" = x86_64 ] && flags="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
cmake -S "$src/vendor/llama.cpp" -B "$out/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DCMAKE_C_FLAGS="$flags" -DCMAKE_CXX_FLAGS="$flags" \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF >&2
# one target at a time: parallel builds of several tools race on the shared static libraries
for t in llama-bench llama-server llama-perplexity; do
  cmake --build "$out/build" -j"$(nproc)" --target "$t" >&2
done
echo "$bin"
