# Sourced by start.sh and stop.sh: sets RAY_BIN to the `ray` to use (RAY_BIN wins, then PATH,
# then the repository's .venv), or exits with a hint.
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [[ -z "${RAY_BIN:-}" ]]; then
    if command -v ray >/dev/null 2>&1; then
        RAY_BIN="$(command -v ray)"
    elif [[ -x "$repo_root/.venv/bin/ray" ]]; then
        RAY_BIN="$repo_root/.venv/bin/ray"
    else
        echo "$(basename "$0"): no 'ray' on PATH and no $repo_root/.venv/bin/ray; run 'make install' or set RAY_BIN" >&2
        exit 1
    fi
fi
