#!/usr/bin/env bash
# MLflow tracking server + model registry with a SQL backend and an artifact store.
#   BACKEND   SQLAlchemy URI of the backend store (default: sqlite in ./mlflow-server/)
#             e.g. postgresql://mlflow:PASSWORD@db:5432/mlflow
#   ARTIFACTS where artifacts live (default: ./mlflow-server/artifacts), e.g. s3://bucket/mlflow
#   HOST/PORT bind address (default 127.0.0.1:5000)
#   APP_NAME  basic-auth: MLflow's built-in authentication (users and per-experiment/model permissions);
#             required when HOST is not a loopback address, unless ALLOW_UNAUTHENTICATED=1 because an
#             authenticating TLS proxy stands in front (see infra/README.md)
set -euo pipefail
HOST=${HOST:-127.0.0.1}
case "$HOST" in
  127.*|localhost|::1) ;;
  *) if [ -z "${APP_NAME:-}" ] && [ "${ALLOW_UNAUTHENTICATED:-0}" != 1 ]; then
       echo "infra/mlflow/start.sh: HOST=$HOST would expose MLflow without authentication (registry write access" \
            "is code execution on the serving host); set APP_NAME=basic-auth, or ALLOW_UNAUTHENTICATED=1 behind" \
            "an authenticating TLS proxy (infra/README.md)" >&2
       exit 2
     fi ;;
esac
DIR=${MLFLOW_SERVER_DIR:-$PWD/mlflow-server}
mkdir -p "$DIR"
BACKEND=${BACKEND:-sqlite:///$DIR/mlflow.db}
ARTIFACTS=${ARTIFACTS:-$DIR/artifacts}
exec mlflow server \
  --backend-store-uri "$BACKEND" \
  --artifacts-destination "$ARTIFACTS" \
  --serve-artifacts \
  ${APP_NAME:+--app-name "$APP_NAME"} \
  --host "$HOST" --port "${PORT:-5000}" "$@"
