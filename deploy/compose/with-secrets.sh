#!/bin/sh
# Entry point of every Clearhouse container in compose. The processes read their secrets
# from environment variables, as they do in Kubernetes, but compose can only mount files:
# secrets-init.py wrote one file per variable, named after it, in groups (public: every
# process; gateway, payments, sandbox: that service alone), and each container mounts only
# its own groups. Export them all, then become `clearhouse <args>`.
set -e

for file in "${CLEARHOUSE_SECRETS_DIR:-/run/clearhouse/env}"/*/*; do
  [ -f "$file" ] || continue  # no group mounted: the pattern stays unexpanded
  export "$(basename "$file")=$(cat "$file")"
done
exec clearhouse "$@"
