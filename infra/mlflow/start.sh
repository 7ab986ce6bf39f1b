#!/usr/bin/env bash
# MLflow tracking server + model registry with a SQL backend and an artifact store.
#   BACKEND   SQLAlchemy URI of the backend store (default: sqlite in ./mlflow-server/)
#             e.g. postgresql://mlflow:PASSWORD@db:5432/mlflow
#   ARTIFACTS where artifacts live (default: ./mlflow-server/artifacts), e.g. s3://bucket/mlflow
#   HOST/PORT bind address (default 127.0.0.1:5000)
set -euo pipefail
DIR=${MLFLOW_SERVER_DIR:-$PWD/mlflow-server}
mkdir -p "$DIR"
BACKEND=${BACKEND:-sqlite:///$DIR/mlflow.db}
ARTIFACTS=${ARTIFACTS:-$DIR/artifacts}
exec mlflow server \
  --backend-store-uri "$BACKEND" \
  --artifacts-destination "$ARTIFACTS" \
  --serve-artifacts \
  --host "${HOST:-127.0.0.1}" --port "${PORT:-5000}" "$@"
