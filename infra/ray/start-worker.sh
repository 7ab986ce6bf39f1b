#!/usr/bin/env bash
# Ray worker joining the head at $1 (HOST:6379). The clipmill package must be installed on every node
# (make setup); code shipped by the driver is added through the job's runtime_env. The head's token
# (~/.ray/auth_token or RAY_AUTH_TOKEN) must be present here too.
set -euo pipefail
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
exec ray start --address "${1:?usage: start-worker.sh HEAD_HOST:6379}" --num-cpus "${NUM_CPUS:-$(nproc)}" --block
