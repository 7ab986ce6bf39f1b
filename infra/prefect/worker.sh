#!/usr/bin/env bash
# A process work pool and a worker that runs clipmill's deployments (prefect.yaml) in this checkout.
# Needs PREFECT_API_URL pointing at the server, e.g. http://127.0.0.1:4200/api.
#   POOL           the work pool to serve (default clipmill, the pool prefect.yaml's deployments name)
#   CLIPMILL_ROOT  the checkout flow runs work in (default: this one; prefect.yaml's pull step reads it)
# Extra arguments go to `prefect worker start` (e.g. --limit 1).
set -euo pipefail
POOL=${POOL:-clipmill}
cd "$(dirname "$0")/../.."
export CLIPMILL_ROOT=${CLIPMILL_ROOT:-$PWD}
prefect work-pool inspect "$POOL" >/dev/null 2>&1 || prefect work-pool create "$POOL" --type process
prefect deploy --all
exec prefect worker start --pool "$POOL" --type process "$@"
