#!/usr/bin/env bash
# Installs the Debian packages a fresh machine needs to build and test tokenomy:
# cmake, g++ and libclang-dev for llama.cpp's build (llama-cpp-sys-2), unzip for the model wheels;
# with --test (as scripts/test.sh runs it) also Chromium and chromedriver for the browser tests of
# the web console, which serving does not need.
set -euo pipefail
for_tests=false
case "${1:-}" in
  "") ;;
  --test) for_tests=true ;;
  *) echo "usage: $0 [--test]" >&2; exit 2 ;;
esac
need=()
command -v cmake >/dev/null || need+=(cmake)
command -v g++ >/dev/null || need+=(g++)
command -v unzip >/dev/null || need+=(unzip)
command -v pkg-config >/dev/null || need+=(pkg-config)
if $for_tests; then
  # A real browser for the web console's tests (tests/python/test_console.py)
  command -v chromium >/dev/null || need+=(chromium)
  command -v chromedriver >/dev/null || need+=(chromium-driver)
fi
# libclang itself (bindgen loads it), not libclang-cpp, which other packages bring alone
ls /usr/lib/llvm-*/lib/libclang.so* /usr/lib/llvm-*/lib/libclang-[0-9]*.so* >/dev/null 2>&1 || need+=(libclang-dev)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi
