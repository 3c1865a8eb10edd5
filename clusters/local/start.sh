#!/usr/bin/env bash
# Start a single-machine Ray head for rayalign, with token authentication on.
#
#   clusters/local/start.sh [--num-cpus N] [--num-gpus N] [--port P] [--dashboard-port P]
#                           [--temp-dir DIR] [--autoscaling [FILE]]
#
# Every option can also be set by environment variable (a flag wins over its variable):
#   RAYALIGN_NUM_CPUS       CPUs Ray may use (default: all cores, `nproc`)
#   RAYALIGN_NUM_GPUS       GPUs Ray may use (default: Ray's own detection)
#   RAYALIGN_RAY_PORT       GCS port (default 6379)
#   RAYALIGN_DASHBOARD_PORT dashboard / job server port (default 8265)
#   RAYALIGN_TEMP_DIR       Ray's session/log directory (default Ray's, /tmp/ray)
#   RAY_BIN                 the `ray` executable (default: `ray` on PATH, else .venv/bin/ray)
#
# --autoscaling [FILE] starts an autoscaling cluster on this machine instead: the head takes
# its resources from FILE (default clusters/local/autoscaling.yaml) and Ray's autoscaler
# adds and removes worker nodes (extra raylets here) with demand. AUTOSCALER_UPDATE_INTERVAL_S
# sets how often it looks (default 5 s).
#
# Security:
#   * RAY_AUTH_MODE=token: every Ray RPC and HTTP endpoint (GCS, dashboard, job server,
#     Ray Client) requires the cluster token.
#   * The token comes, in Ray's order of precedence, from RAY_AUTH_TOKEN if you exported
#     it, else from the file RAY_AUTH_TOKEN_PATH (default ~/.ray/auth_token, Ray's own
#     default path). If the file does not exist this script creates it: 32 random bytes as
#     hex, mode 600. The token is never printed; `ray get-auth-token` shows it if you
#     need it (e.g. to log in to the dashboard in a browser).
#   * Every port of the head listens on 127.0.0.1 only: the dashboard and job server, and
#     Ray's GCS, raylet, agent and Ray Client gRPC ports (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0,
#     see below). Nothing of this cluster is reachable from another machine.
#
# `ray start` runs in a session of its own (setsid, util-linux); every process of the cluster
# keeps that session id, which is recorded in the state file
#   <temp dir>/rayalign-head-<GCS port>.sid
# (temp dir: --temp-dir, else Ray's default ${RAY_TMPDIR:-${TMPDIR:-/tmp}}/ray).
# Stop the cluster with clusters/local/stop.sh (same --port and --temp-dir): it stops the
# processes of that session only, never another Ray cluster on this machine.
set -euo pipefail

usage() {
    sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
}

num_cpus="${RAYALIGN_NUM_CPUS:-}"
num_gpus="${RAYALIGN_NUM_GPUS:-}"
gcs_port="${RAYALIGN_RAY_PORT:-6379}"
dashboard_port="${RAYALIGN_DASHBOARD_PORT:-8265}"
temp_dir="${RAYALIGN_TEMP_DIR:-}"
autoscaling_config=""

while [[ $# -gt 0 ]]; do
    case "$1" in
        --num-cpus) num_cpus="${2:?--num-cpus needs a value}"; shift 2 ;;
        --num-cpus=*) num_cpus="${1#*=}"; shift ;;
        --num-gpus) num_gpus="${2:?--num-gpus needs a value}"; shift 2 ;;
        --num-gpus=*) num_gpus="${1#*=}"; shift ;;
        --port) gcs_port="${2:?--port needs a value}"; shift 2 ;;
        --port=*) gcs_port="${1#*=}"; shift ;;
        --dashboard-port) dashboard_port="${2:?--dashboard-port needs a value}"; shift 2 ;;
        --dashboard-port=*) dashboard_port="${1#*=}"; shift ;;
        --temp-dir) temp_dir="${2:?--temp-dir needs a value}"; shift 2 ;;
        --temp-dir=*) temp_dir="${1#*=}"; shift ;;
        --autoscaling)
            autoscaling_config="$(dirname "${BASH_SOURCE[0]}")/autoscaling.yaml"
            if [[ $# -gt 1 && "$2" != --* ]]; then autoscaling_config="$2"; shift; fi
            shift ;;
        --autoscaling=*) autoscaling_config="${1#*=}"; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "start.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done

if [[ -n "$autoscaling_config" && -n "$num_cpus" ]]; then
    echo "start.sh: with --autoscaling the head's CPUs come from $autoscaling_config, not --num-cpus" >&2
    exit 2
fi
if [[ -n "$autoscaling_config" && ! -f "$autoscaling_config" ]]; then
    echo "start.sh: autoscaling config not found: $autoscaling_config" >&2
    exit 2
fi
if [[ -z "$num_cpus" && -z "$autoscaling_config" ]]; then
    num_cpus="$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN)"
fi
for pair in "num-cpus:${num_cpus:-0}" "port:$gcs_port" "dashboard-port:$dashboard_port" "num-gpus:${num_gpus:-0}"; do
    if ! [[ "${pair#*:}" =~ ^[0-9]+$ ]]; then
        echo "start.sh: --${pair%%:*} must be a non-negative integer, got '${pair#*:}'" >&2
        exit 2
    fi
done
if [[ -z "$autoscaling_config" && "$num_cpus" -lt 1 ]]; then
    echo "start.sh: --num-cpus must be at least 1" >&2
    exit 2
fi

# The `ray` to use. When it comes from the repository's virtual environment, put that
# environment's bin/ first on PATH so that job entrypoints (`rayalign ...`) resolve too.
source "$(dirname "${BASH_SOURCE[0]}")/find-ray.sh"
export PATH="$(dirname "$RAY_BIN"):$PATH"
# setsid (util-linux) runs `ray start` in a session of its own (see below).
if ! command -v setsid >/dev/null 2>&1; then
    echo "start.sh: 'setsid' (util-linux) is needed to start Ray in a session of its own; install util-linux" >&2
    exit 1
fi

if [[ -n "$autoscaling_config" ]]; then
    # The provider must know this head's GCS port; the head's CPUs are the head node type's.
    resolved_config="$(mktemp "${TMPDIR:-/tmp}/rayalign-autoscaling.XXXXXX")"
    python_bin="$(dirname "$RAY_BIN")/python"
    [[ -x "$python_bin" ]] || python_bin=python3
    num_cpus="$("$python_bin" - "$autoscaling_config" "$gcs_port" "$resolved_config" <<'PY'
import sys

import yaml

source, port, resolved = sys.argv[1:]
with open(source) as f:
    config = yaml.safe_load(f)
config["provider"]["gcs_address"] = f"127.0.0.1:{port}"
with open(resolved, "w") as f:
    yaml.safe_dump(config, f)
print(int(config["available_node_types"][config["head_node_type"]]["resources"].get("CPU", 0)))
PY
)"
    export RAY_FAKE_CLUSTER=1
    export AUTOSCALER_UPDATE_INTERVAL_S="${AUTOSCALER_UPDATE_INTERVAL_S:-5}"
fi

# Token authentication. Ray reads RAY_AUTH_TOKEN first, then the file RAY_AUTH_TOKEN_PATH.
export RAY_AUTH_MODE=token
if [[ -n "${RAY_AUTH_TOKEN:-}" ]]; then
    token_source="the RAY_AUTH_TOKEN environment variable; clients need it exported too"
    client_env="RAY_AUTH_MODE=token"
else
    token_file="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
    if [[ ! -s "$token_file" ]]; then
        token_dir="$(dirname "$token_file")"
        if [[ ! -d "$token_dir" ]]; then
            mkdir -p "$token_dir"
            chmod 700 "$token_dir"
        fi
        # umask 077: the file is created 600, never readable by others, not even briefly.
        tmp_file="$(umask 077 && mktemp "$token_dir/.auth_token.XXXXXX")"
        trap 'rm -f "$tmp_file"' EXIT
        (umask 077 && od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$tmp_file")
        mv -f "$tmp_file" "$token_file"
        trap - EXIT
        echo "Created a new Ray auth token file: $token_file (mode 600; not shown)"
    fi
    chmod 600 "$token_file"
    export RAY_AUTH_TOKEN_PATH="$token_file"
    token_source="$token_file"
    client_env="RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$token_file"
fi

ray_args=(
    start --head
    --port "$gcs_port"
    --node-ip-address 127.0.0.1
    --dashboard-host 127.0.0.1
    --dashboard-port "$dashboard_port"
    # The dashboard agent's HTTP port (job submission goes through it) on a free port, not
    # Ray's fixed 52365: with another Ray cluster on this machine holding 52365, this head's
    # job server would answer "No available agent to submit job".
    --dashboard-agent-listen-port 0
    --num-cpus "$num_cpus"
    --disable-usage-stats
)
if [[ -n "$num_gpus" ]]; then
    ray_args+=(--num-gpus "$num_gpus")
fi
if [[ -n "$temp_dir" ]]; then
    ray_args+=(--temp-dir "$temp_dir")
fi
if [[ -n "$autoscaling_config" ]]; then
    ray_args+=(--autoscaling-config "$resolved_config")
fi

# Ray replaces --node-ip-address 127.0.0.1 by this machine's address and binds its gRPC
# servers (GCS, raylet, agents, Ray Client) to every interface, unless it believes it runs a
# single-machine cluster: with this variable at 0 it keeps every port on 127.0.0.1. (It also
# refuses `ray start --address` joins, which a single-machine head does not need; the
# autoscaler's fake worker nodes are started in-process, not with `ray start`.) The cluster's
# own processes, job entrypoints included, inherit it; a client outside the cluster that
# connects to the GCS (`ray status --address 127.0.0.1:P`, `ray.init(address=...)`) needs it
# exported too, or Ray turns 127.0.0.1 into this machine's address, where nothing listens.
# Job submission over HTTP (RAY_ADDRESS=http://127.0.0.1:<dashboard port>) does not.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0

# Run `ray start` in a new session: the cluster's processes (and the Ray workers they spawn)
# keep its id, so stop.sh can find exactly this cluster. The new session's leader is the bash
# below (its pid is the session id), which records it and becomes `ray start`; setsid --wait
# returns ray start's exit code. The state file is replaced only when ray start succeeded, so
# a failed second start on the same port does not lose the running cluster's record.
state_dir="${temp_dir:-${RAY_TMPDIR:-${TMPDIR:-/tmp}}/ray}"
state_file="$state_dir/rayalign-head-$gcs_port.sid"
mkdir -p "$state_dir"
sid_file="$(mktemp "$state_dir/.rayalign-head-$gcs_port.XXXXXX")"
trap 'rm -f "$sid_file"' EXIT
rc=0
setsid --wait bash -c 'echo "$$" >"$1"; shift; exec "$@"' _ "$sid_file" "$RAY_BIN" "${ray_args[@]}" || rc=$?
if [[ $rc -ne 0 ]]; then
    echo "start.sh: ray start failed (exit $rc)" >&2
    exit "$rc"
fi
mv -f "$sid_file" "$state_file"
trap - EXIT

dashboard_url="http://127.0.0.1:$dashboard_port"
stop_cmd="clusters/local/stop.sh"
[[ "$gcs_port" == 6379 ]] || stop_cmd+=" --port $gcs_port"
[[ -z "$temp_dir" ]] || stop_cmd+=" --temp-dir $temp_dir"
cat <<EOF

rayalign local Ray head is up (token authentication on; token from $token_source).
  Autoscaling:            ${autoscaling_config:-off}
  Dashboard / job server: $dashboard_url   (log in with the output of 'ray get-auth-token')
  GCS address:            127.0.0.1:$gcs_port   (GCS clients, e.g. 'ray status', need RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 too)
  RAY_ADDRESS for jobs:   $dashboard_url

Submit a job from the repository root:
  $client_env RAY_ADDRESS=$dashboard_url \\
    ray job submit --runtime-env jobs/runtime-env.yaml -- \\
      python -m rayalign train --config jobs/configs/tiny-dpo.yaml --set output.storage=file://\$PWD/runs

Stop it with: $stop_cmd
EOF
