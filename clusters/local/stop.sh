#!/usr/bin/env bash
# Stop the local Ray head started by clusters/local/start.sh.
#
#   clusters/local/stop.sh [--force]
#
# `ray stop` stops every Ray process of the current user on this machine, not only the
# ones start.sh launched. The auth token file (~/.ray/auth_token or RAY_AUTH_TOKEN_PATH)
# is kept, so the next start.sh reuses the same token; delete it to rotate the token.
set -euo pipefail

force=()
case "${1:-}" in
    "") ;;
    --force) force=(--force) ;;
    -h | --help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "stop.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
esac

source "$(dirname "${BASH_SOURCE[0]}")/find-ray.sh"

"$RAY_BIN" stop "${force[@]+"${force[@]}"}"
echo "Ray stopped. The auth token file was left in place."
