#!/usr/bin/env bash
# The whole test suite: Rust unit + integration tests with the real models, then the official
# `openai` Python package against a running node. Installs what it needs (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
bash scripts/fetch-test-models.sh
# A real PostgreSQL server for the ledger's conformance suite (installed and started here).
if [ -z "${TOKENOMY_TEST_POSTGRES_URL:-}" ]; then
  TOKENOMY_TEST_POSTGRES_URL=$(bash scripts/start-postgres.sh)  # fails the run if it fails
fi
export TOKENOMY_TEST_POSTGRES_URL
cargo build --locked --workspace --all-targets
cargo test --locked --workspace
# Python clients, against the built binary
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt
TOKENOMY_BIN="$PWD/target/debug/tokenomy" .venv/bin/python -m pytest -q tests/python
