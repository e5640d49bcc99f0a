#!/usr/bin/env bash
# Installs PostgreSQL (Debian package) if missing, starts a local server on
# 127.0.0.1:5432, creates role/database `tokenomy`/`tokenomy_test`, and prints
# the URL for TOKENOMY_TEST_POSTGRES_URL on stdout (everything else on stderr).
# Usage: export TOKENOMY_TEST_POSTGRES_URL="$(scripts/start-postgres.sh)"
set -euo pipefail
exec 3>&1 1>&2

if ! command -v pg_ctlcluster >/dev/null || ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq postgresql >/dev/null
fi

version="$(ls /usr/lib/postgresql | sort -V | tail -1)"
if ! pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main"' | grep -q .; then
    pg_createcluster "$version" main
fi
pg_conftool "$version" main set listen_addresses localhost >/dev/null
pg_conftool "$version" main set port 5432 >/dev/null
if ! pg_lsclusters -h | awk -v v="$version" '$1 == v && $2 == "main" && $4 == "online"' | grep -q .; then
    # The server is a daemon: it must not inherit this script's stdout (fd 3, often the pipe of a
    # `$(...)` that waits for EOF) nor the caller's stderr pipe, or whoever reads them waits forever.
    log="$(mktemp)"
    if ! pg_ctlcluster "$version" main start </dev/null >"$log" 2>&1 3>&-; then
        cat "$log"; rm -f "$log"; exit 1
    fi
    cat "$log"; rm -f "$log"
fi

for _ in $(seq 1 30); do
    pg_isready -q -h 127.0.0.1 -p 5432 && break
    sleep 1
done
pg_isready -h 127.0.0.1 -p 5432

as_pg() { (cd / && su postgres -c "$1"); }
as_pg "psql -qtAc \"SELECT 1 FROM pg_roles WHERE rolname = 'tokenomy'\"" | grep -q 1 ||
    as_pg "psql -qc \"CREATE ROLE tokenomy LOGIN PASSWORD 'tokenomy' CREATEDB\""
as_pg "psql -qtAc \"SELECT 1 FROM pg_database WHERE datname = 'tokenomy_test'\"" | grep -q 1 ||
    as_pg "createdb -O tokenomy tokenomy_test"

echo "postgres://tokenomy:tokenomy@127.0.0.1:5432/tokenomy_test" >&3
