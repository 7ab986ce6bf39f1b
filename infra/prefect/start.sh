#!/usr/bin/env bash
# Prefect server (API + UI). PREFECT_API_DATABASE_CONNECTION_URL selects the database
# (default SQLite in PREFECT_HOME; postgresql+asyncpg://... for a shared server).
# PREFECT_SERVER_API_AUTH_STRING (user:password) turns on the server's basic authentication (clients set
# PREFECT_API_AUTH_STRING); it is required when HOST is not a loopback address, unless ALLOW_UNAUTHENTICATED=1
# because an authenticating TLS proxy stands in front (see infra/README.md).
set -euo pipefail
HOST=${HOST:-127.0.0.1}
case "$HOST" in
  127.*|localhost|::1) ;;
  *) if [ -z "${PREFECT_SERVER_API_AUTH_STRING:-}" ] && [ "${ALLOW_UNAUTHENTICATED:-0}" != 1 ]; then
       echo "infra/prefect/start.sh: HOST=$HOST would expose the Prefect API without authentication (it starts" \
            "flow runs on the workers); set PREFECT_SERVER_API_AUTH_STRING, or ALLOW_UNAUTHENTICATED=1 behind an" \
            "authenticating TLS proxy (infra/README.md)" >&2
       exit 2
     fi ;;
esac
exec prefect server start --host "$HOST" --port "${PORT:-4200}" "$@"
