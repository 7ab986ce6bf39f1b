#!/usr/bin/env bash
# Prefect server (API + UI). PREFECT_API_DATABASE_CONNECTION_URL selects the database
# (default SQLite in PREFECT_HOME; postgresql+asyncpg://... for a shared server).
set -euo pipefail
exec prefect server start --host "${HOST:-127.0.0.1}" --port "${PORT:-4200}" "$@"
