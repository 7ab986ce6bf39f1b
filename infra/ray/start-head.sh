#!/usr/bin/env bash
# Ray head node. Curation stages (engine: ray) and the tune stage connect with ray.address: HOST:6379.
set -euo pipefail
exec ray start --head --node-ip-address "${HOST:-127.0.0.1}" --port "${PORT:-6379}" \
  --num-cpus "${NUM_CPUS:-$(nproc)}" --include-dashboard false --block "$@"
