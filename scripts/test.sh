#!/usr/bin/env bash
# The whole test suite: Rust unit + integration tests with the real models, then the official
# `openai` Python package against a running node. Installs what it needs (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n==> [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }
# Every phase has a wall-clock limit, so a hang fails the run with a name instead of a silent CI
# timeout. Generous: the whole suite takes ~6 min on 2 cores after a ~16 min fresh build.
limited() { local limit="$1"; shift; timeout --kill-after=30s "$limit" "$@"; }
step install-deps
bash scripts/install-deps.sh --test
step fetch-test-models
bash scripts/fetch-test-models.sh
step start-postgres
# A real PostgreSQL server for the ledger's conformance suite (installed and started here).
if [ -z "${TOKENOMY_TEST_POSTGRES_URL:-}" ]; then
  TOKENOMY_TEST_POSTGRES_URL=$(limited 10m bash scripts/start-postgres.sh)  # fails the run if it fails
fi
export TOKENOMY_TEST_POSTGRES_URL
step cargo build
limited 60m cargo build --locked --workspace --all-targets
step cargo test
limited 30m cargo test --locked --workspace
step python clients
# Python clients, against the built binary
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt
TOKENOMY_BIN="$PWD/target/debug/tokenomy" limited 15m .venv/bin/python -m pytest -q tests/python
step done
