#!/usr/bin/env bash
# Ray head node. The curate stage (curate.executor: ray) and the tune stage connect with ray.address: HOST:6379.
# The cluster requires Ray's token authentication (RAY_AUTH_MODE=token, the default here): the token is
# ~/.ray/auth_token (created on first start). Every client and worker needs the same token (copy the file, or
# set RAY_AUTH_TOKEN) and RAY_AUTH_MODE=token in its environment, e.g. before `clipmill run` or `dvc repro`.
set -euo pipefail
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
HOST=${HOST:-127.0.0.1}
case "$HOST" in
  127.*|localhost|::1) ;;
  *) if [ "$RAY_AUTH_MODE" != token ]; then
       echo "infra/ray/start-head.sh: HOST=$HOST with RAY_AUTH_MODE=$RAY_AUTH_MODE would let anyone who reaches" \
            "the head run code on the cluster; keep RAY_AUTH_MODE=token (infra/README.md)" >&2
       exit 2
     fi ;;
esac
if [ "$RAY_AUTH_MODE" = token ] && [ -z "${RAY_AUTH_TOKEN:-}" ]; then
  ray get-auth-token --generate >/dev/null
fi
exec ray start --head --node-ip-address "$HOST" --port "${PORT:-6379}" \
  --num-cpus "${NUM_CPUS:-$(nproc)}" --include-dashboard false --block "$@"
