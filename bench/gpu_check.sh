#!/usr/bin/env bash
# tokenomy on a CUDA GPU, checked and measured on a machine with the CUDA toolkit but no Rust:
#   1. builds llama.cpp (shared libraries, CUDA, plus llama-bench and llama-server) from SRC, a
#      tree of the same llama.cpp as llama-cpp-sys-2 vendors (with llama.cpp's tools/ added);
#   2. runs BIN, a tokenomy built elsewhere with `--features dynamic-link`, on those libraries;
#   3. checks the devices found, greedy answers batched vs alone (tokenomy's and llama-server's),
#      teacher forcing, and that SIGTERM still ends the node with status 0; then, unless
#      GPU_CHECK_QUICK=1, runs bench/single_stream.py and bench/compare_servers.py with every
#      layer on the GPU.
# Usage: bench/gpu_check.sh SRC BIN MODEL.gguf OUT_DIR [CUDA_ARCH, default 90]
set -uo pipefail
src=$1 bin=$2 model=$3 out=$4 arch=${5:-90}
here=$(cd "$(dirname "$0")" && pwd)
build=/tmp/gpu-check-build
mkdir -p "$out"
get() { python3 -c 'import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode())' "$1" 2>/dev/null; }
nvidia-smi -L; nvcc --version | tail -1
t0=$(date +%s)
cmake -S "$src" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DGGML_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES="$arch" -DGGML_CUDA_NCCL=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON \
  -DLLAMA_BUILD_APP=OFF -DLLAMA_USE_PREBUILT_UI=OFF > "$out/cmake.log" 2>&1 || { tail -30 "$out/cmake.log"; exit 1; }
cmake --build "$build" -j"$(nproc)" --target llama > "$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
echo "libllama with CUDA built in $(( $(date +%s) - t0 )) s"
tools="llama-server"; [ "${GPU_CHECK_QUICK:-0}" = 1 ] || tools="llama-bench llama-server"
cmake --build "$build" -j"$(nproc)" --target $tools >> "$out/build.log" 2>&1 \
  || { echo "llama.cpp's tools did not build:"; grep -m5 -i error "$out/build.log"; }
echo "all built in $(( $(date +%s) - t0 )) s"
export LD_LIBRARY_PATH=$build/bin
ldd "$bin" | grep -E "llama|ggml|not found"

# The model may still be on its way (it is copied in while llama.cpp builds).
for _ in $(seq 600); do [ -f "$model" ] && break; sleep 1; done
# One node, every layer on the GPU (the default of a GPU build), its log kept.
data=$(mktemp -d)
"$bin" serve --model "$model" --parallel 8 --ctx-size 1024 --no-auth --data-dir "$data" \
  --listen 127.0.0.1:18080 > "$out/serve.log" 2>&1 &
pid=$!
for _ in $(seq 120); do get http://127.0.0.1:18080/ready > /dev/null && break; sleep 0.5; done
grep -E "llama.cpp devices|offloaded|CUDA0" "$out/serve.log" | head -8
nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv; echo "tokenomy pid $pid"
name=$(get http://127.0.0.1:18080/v1/models | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')
timeout 120 python3 "$here/batched_vs_alone.py" --url http://127.0.0.1:18080/v1 --model "$name" --requests 8 --max-tokens 64
get http://127.0.0.1:18080/metrics | grep -E "^tokenomy_(prompt|completion|decoded)_" | head -8
kill -TERM $pid; wait $pid; echo "tokenomy exited with status $? after SIGTERM (0 expected)"
grep -c "CUDA error" "$out/serve.log" | sed 's/^/CUDA errors in its log: /'
timeout 120 python3 "$here/teacher_forcing.py" --tokenomy "$bin" --model "$model" --gpu-layers 99
if [ -x "$build/bin/llama-server" ]; then
  "$build/bin/llama-server" -m "$model" -np 8 -c 8192 -ngl 99 --host 127.0.0.1 --port 18081 > "$out/llama-server.log" 2>&1 &
  lpid=$!
  for _ in $(seq 120); do get http://127.0.0.1:18081/health > /dev/null && break; sleep 0.5; done
  echo "llama-server, the same check:"
  timeout 120 python3 "$here/batched_vs_alone.py" --url http://127.0.0.1:18081/v1 --model "$name" --requests 8 --max-tokens 64
  kill $lpid; wait $lpid
fi
[ "${GPU_CHECK_QUICK:-0}" = 1 ] && { echo "done in $(( $(date +%s) - t0 )) s"; exit 0; }

if [ -x "$build/bin/llama-bench" ]; then
  timeout 180 python3 "$here/single_stream.py" --tokenomy "$bin" --llama-bench "$build/bin/llama-bench" \
    --model "$model" --threads 8 --rounds 5 --gpu-layers 99
fi
if [ -x "$build/bin/llama-server" ]; then
  timeout 300 python3 "$here/compare_servers.py" --tokenomy "$bin" --llama-server "$build/bin/llama-server" \
    --model "$model" --threads 8 --gpu-layers 99 --json-out "$out/compare8.json"
  timeout 300 python3 "$here/compare_servers.py" --tokenomy "$bin" --llama-server "$build/bin/llama-server" \
    --model "$model" --threads 8 --gpu-layers 99 --streams 32 --max-tokens 128 --rounds 2 --json-out "$out/compare32.json"
fi
echo "done in $(( $(date +%s) - t0 )) s"
