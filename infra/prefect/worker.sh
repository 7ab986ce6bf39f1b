#!/usr/bin/env bash
# A process work pool and a worker that runs clipmill's deployments (prefect.yaml) in this checkout.
# Needs PREFECT_API_URL pointing at the server, e.g. http://127.0.0.1:4200/api.
set -euo pipefail
POOL=${POOL:-clipmill}
cd "$(dirname "$0")/../.."
prefect work-pool inspect "$POOL" >/dev/null 2>&1 || prefect work-pool create "$POOL" --type process
prefect deploy --all
exec prefect worker start --pool "$POOL"
