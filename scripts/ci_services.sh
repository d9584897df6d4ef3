#!/usr/bin/env bash
# Prepare what the PostgreSQL end-to-end test (tests/test_ops_postgres.py) needs:
#   - PostgreSQL server binaries from the system's packages (apt, as root), and
#   - the database drivers in ./.venv: asyncpg (Prefect) and psycopg2-binary (MLflow).
# Idempotent, and never fatal: where something can't be installed the test is skipped
# with a message that says what is missing.
set -uo pipefail
cd "$(dirname "$0")/.."

have_postgres() {
  command -v pg_ctl >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null
}

if have_postgres; then
  echo "postgresql: already installed"
elif [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "postgresql: installing from the system's packages"
  export DEBIAN_FRONTEND=noninteractive
  (apt-get install -y -q --no-install-recommends postgresql >/dev/null 2>&1 \
    || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends postgresql >/dev/null 2>&1)) \
    || echo "note: could not install postgresql; the PostgreSQL end-to-end test will be skipped"
  # The packaged cluster is not used (the test starts its own on a free loopback port).
  if command -v pg_ctlcluster >/dev/null 2>&1; then
    for v in /etc/postgresql/*/main; do [ -d "$v" ] && pg_ctlcluster "$(basename "$(dirname "$v")")" main stop >/dev/null 2>&1; done
  fi
else
  echo "note: postgresql is not installed and apt-get is unavailable (or not root); the PostgreSQL test will be skipped"
fi

if [ -x .venv/bin/python ]; then
  .venv/bin/python -m pip install -q -e ".[test,postgres]" \
    || echo "note: could not install asyncpg/psycopg2-binary; the PostgreSQL test will be skipped"
else
  echo "note: no ./.venv yet (run make install first); database drivers not installed"
fi
exit 0
