#!/usr/bin/env bash
# Stop the local Ray head started by clusters/local/start.sh, and only that one.
#
#   clusters/local/stop.sh [--port P] [--temp-dir DIR] [--force]
#
# --port and --temp-dir name the cluster as start.sh was given them (defaults as there:
# RAYALIGN_RAY_PORT or 6379, RAYALIGN_TEMP_DIR or Ray's ${RAY_TMPDIR:-${TMPDIR:-/tmp}}/ray).
# start.sh ran `ray start` in a session of its own and recorded the session id in
# <temp dir>/rayalign-head-<port>.sid. This script stops the processes of that session and
# their descendants (Ray workers, job entrypoints), and nothing else: SIGTERM in Ray's own
# order (raylets, then the rest, the GCS server last), SIGKILL for whatever of each group is
# left after 5 s (--force: SIGKILL to all at once). It never runs `ray stop`, which would stop
# every Ray cluster of your user on this machine. The auth token file (~/.ray/auth_token or
# RAY_AUTH_TOKEN_PATH) is kept, so the next start.sh reuses the same token; delete it to
# rotate the token.
set -euo pipefail

gcs_port="${RAYALIGN_RAY_PORT:-6379}"
temp_dir="${RAYALIGN_TEMP_DIR:-}"
force=0
grace_s=15

while [[ $# -gt 0 ]]; do
    case "$1" in
        --port) gcs_port="${2:?--port needs a value}"; shift 2 ;;
        --port=*) gcs_port="${1#*=}"; shift ;;
        --temp-dir) temp_dir="${2:?--temp-dir needs a value}"; shift 2 ;;
        --temp-dir=*) temp_dir="${1#*=}"; shift ;;
        --force) force=1; shift ;;
        -h | --help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "stop.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
if ! [[ "$gcs_port" =~ ^[0-9]+$ ]]; then
    echo "stop.sh: --port must be a non-negative integer, got '$gcs_port'" >&2
    exit 2
fi

state_dir="${temp_dir:-${RAY_TMPDIR:-${TMPDIR:-/tmp}}/ray}"
state_file="$state_dir/rayalign-head-$gcs_port.sid"
uid="$(id -u)"
not_running="no rayalign head on port $gcs_port (started by start.sh) is running"

# Sets pstate and pstart to the state and start time of process $1 from /proc/PID/stat (after
# the command name, which may hold spaces: field 3 is the state, field 22 the start time);
# fails for a gone process. No subshell: it runs often while the cluster shuts down.
proc_stat() {
    local stat
    { read -r stat <"/proc/$1/stat"; } 2>/dev/null || return 1
    stat="${stat##*) }"
    # shellcheck disable=SC2086
    set -- $stat
    pstate="$1" pstart="${20}"
}

# The processes of session $1 owned by this user, plus all their descendants (job
# entrypoints run in sessions of their own under a Ray worker of the cluster); not this script.
cluster_pids() {
    ps -eo pid=,ppid=,sid=,uid= | awk -v sid="$1" -v uid="$uid" -v self="$$" '
        { pid[NR] = $1; ppid[NR] = $2; s[NR] = $3; u[NR] = $4 }
        END {
            for (i = 1; i <= NR; i++) if (s[i] == sid && u[i] == uid) mark[pid[i]] = 1
            do {
                changed = 0
                for (i = 1; i <= NR; i++)
                    if (!(pid[i] in mark) && (ppid[i] in mark) && u[i] == uid) { mark[pid[i]] = 1; changed = 1 }
            } while (changed)
            for (p in mark) if (p != self) print p
        }'
}

# True when session $1 holds a process of this user whose command line names this GCS port
# (the GCS server, raylets, agents, workers all do): guards against a stale state file whose
# session id now belongs to something else. -ww: never cut the command line.
is_this_cluster() {
    ps -ww -eo sid=,uid=,args= | awk -v sid="$1" -v uid="$uid" -v port="$gcs_port" '
        $1 == sid && $2 == uid && ($0 ~ ("--gcs_server_port=" port "( |$)") || $0 ~ ("--gcs-address=[^ ]*:" port "( |$)")) { found = 1 }
        END { exit !found }'
}

sid=""
if [[ -f "$state_file" && -O "$state_file" ]]; then
    sid="$(head -n 1 "$state_file")"
fi
if ! [[ "$sid" =~ ^[1-9][0-9]*$ ]] || ! is_this_cluster "$sid"; then
    [[ -f "$state_file" && -O "$state_file" ]] && rm -f "$state_file"
    echo "$not_running"
    exit 0
fi

# Remember each process with its start time, so a pid reused meanwhile is never signalled.
declare -A started=()
remember() {
    local pid
    for pid in $(cluster_pids "$sid"); do
        [[ -n "${started[$pid]:-}" ]] && continue
        proc_stat "$pid" && started[$pid]="$pstart"
    done
    return 0
}
# Sets left to the remembered pids still alive (zombies count as gone) and still the process
# first seen; with an argument, only those whose command name is it ("others": neither
# raylet nor gcs_server).
alive() {
    local pid comm
    left=()
    for pid in "${!started[@]}"; do
        proc_stat "$pid" || continue
        [[ "$pstate" != Z && "$pstart" == "${started[$pid]}" ]] || continue
        if [[ $# -gt 0 ]]; then
            { read -r comm <"/proc/$pid/comm"; } 2>/dev/null || continue
            case "$1" in
                others) [[ "$comm" != raylet && "$comm" != gcs_server ]] || continue ;;
                *) [[ "$comm" == "$1" ]] || continue ;;
            esac
        fi
        left+=("$pid")
    done
    return 0
}
# SIGTERM (once each) to the processes `alive $1` finds, and to any that appear meanwhile; up
# to $2 seconds for them to exit, then SIGKILL to the rest.
declare -A termed=()
stop_group() {
    local i pid
    for ((i = 0; i < $2 * 5; i++)); do
        remember
        alive "$1"
        [[ ${#left[@]} -eq 0 ]] && return 0
        for pid in "${left[@]}"; do
            [[ -n "${termed[$pid]:-}" ]] && continue
            kill -TERM "$pid" 2>/dev/null || true
            termed[$pid]=1
        done
        sleep 0.2
    done
    alive "$1"
    [[ ${#left[@]} -eq 0 ]] && return 0
    echo "Killing ${#left[@]} processes ($1) still running after $2 s"
    kill -KILL "${left[@]}" 2>/dev/null || true
}

remember
echo "Stopping the rayalign head on port $gcs_port: session $sid, ${#started[@]} processes"
if [[ $force -eq 1 ]]; then
    alive
    kill -KILL "${left[@]}" 2>/dev/null || true
else
    # Ray's own order (as `ray stop`): raylets first (their workers and agents follow them),
    # then everything else, the GCS server last; $grace_s in all.
    stop_group raylet $((grace_s / 3))
    stop_group others $((grace_s / 3))
    stop_group gcs_server $((grace_s / 3))
fi
for ((i = 0; i < 50; i++)); do
    remember
    alive
    [[ ${#left[@]} -eq 0 ]] && break
    kill -KILL "${left[@]}" 2>/dev/null || true
    sleep 0.1
done
rm -f "$state_file"
if [[ ${#left[@]} -gt 0 ]]; then
    echo "stop.sh: processes still alive: ${left[*]}" >&2
    exit 1
fi
echo "Ray head on port $gcs_port stopped. The auth token file was left in place."
