#!/usr/bin/env bash
# `make serve`: a local Prefect server for the workspace in the current directory, its deployments
# (prefect.yaml: scheduled full retraining, forget on `sisaflow.deletion.requested`, scheduled drain) and a
# process worker that runs them in this workspace. Both keep running after this script returns; it prints
# their PIDs and how to stop them.
#
# Environment: VENV (default .venv), PREFECT_PORT (default 4200), SISAFLOW_SERVE_TIMEOUT (seconds to wait for
# the server, default 120).
set -euo pipefail

WS="$(pwd -P)"
VENV_DIR="${VENV:-.venv}"
PREFECT="${VENV_DIR}/bin/prefect"
PY="${VENV_DIR}/bin/python"
HOST=127.0.0.1
PORT="${PREFECT_PORT:-4200}"
STATE="$WS/.sisaflow/prefect-server"
TIMEOUT="${SISAFLOW_SERVE_TIMEOUT:-120}"

die() { echo "serve: $*" >&2; exit 1; }

[[ -x "$PREFECT" ]] || die "$PREFECT not found: run \`make setup\` or set VENV to the virtual environment"
[[ -f "$WS/prefect.yaml" ]] || die "no prefect.yaml in $WS: run this from a sisaflow workspace"
PREFECT="$(cd "$(dirname "$PREFECT")" && pwd -P)/prefect"
PY="$(cd "$(dirname "$PY")" && pwd -P)/$(basename "$PY")"
# the work pool prefect.yaml's deployments name (sisaflow-<workspace name>)
POOL="$("$PY" -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["deployments"][0]["work_pool"]["name"])' "$WS/prefect.yaml")" \
    || die "$WS/prefect.yaml: no work pool named in its deployments"

if (exec 3<>"/dev/tcp/$HOST/$PORT") 2>/dev/null; then
    die "port $PORT on $HOST is already in use (a server already running?); stop it or set PREFECT_PORT"
fi

mkdir -p "$STATE"
# Only these settings: a Prefect profile or a PREFECT_API_URL from the caller must not redirect the deploy.
unset PREFECT_PROFILE PREFECT_API_KEY
export PREFECT_HOME="$STATE"
export PREFECT_API_URL="http://$HOST:$PORT/api"
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export RAY_USAGE_STATS_ENABLED=0
# The deployments' pull step is set_working_directory: "{{ $SISAFLOW_WORKSPACE }}"; the worker's flow runs
# resolve it from this variable, and the flows run in the workspace.
export SISAFLOW_WORKSPACE="$WS"

# Job control: each background process gets its own process group and, unlike the background jobs of a
# script without job control, does not start with SIGINT ignored. Prefect's worker turns SIGTERM into a
# SIGINT to itself; with SIGINT ignored, `kill WORKER_PID` would leave it hanging. nohup: survives the terminal.
set -m

STARTED=()
cleanup() {
    local rc=$?
    if (( rc != 0 && ${#STARTED[@]} > 0 )); then
        echo "serve: failed; stopping PID(s) ${STARTED[*]}" >&2
        kill "${STARTED[@]}" 2>/dev/null || true
    fi
}
trap cleanup EXIT

echo "starting the Prefect server on http://$HOST:$PORT (home $STATE)"
nohup "$PREFECT" server start --host "$HOST" --port "$PORT" \
    >"$STATE/server.log" 2>&1 </dev/null &
SERVER_PID=$!
STARTED+=("$SERVER_PID")

healthy() { "$PY" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' \
    "$PREFECT_API_URL/health" >/dev/null 2>&1; }
waited=0
until healthy; do
    kill -0 "$SERVER_PID" 2>/dev/null || { tail -n 30 "$STATE/server.log" >&2; die "the server exited"; }
    (( waited < TIMEOUT )) || { tail -n 30 "$STATE/server.log" >&2; die "server not healthy after ${TIMEOUT}s"; }
    sleep 1
    waited=$((waited + 1))
done
echo "server up after ${waited}s"

if ! "$PREFECT" work-pool inspect "$POOL" >/dev/null 2>&1; then
    "$PREFECT" work-pool create "$POOL" --type process >/dev/null
    echo "created the process work pool '$POOL'"
fi
# one flow run at a time in this workspace, the others queued (prefect.yaml's deployments also say so each)
"$PREFECT" work-pool set-concurrency-limit "$POOL" 1 >/dev/null

echo "deploying prefect.yaml"
"$PREFECT" --no-prompt deploy --all >"$STATE/deploy.log" 2>&1 || { cat "$STATE/deploy.log" >&2; die "prefect deploy failed"; }
grep -o "Deployment '[^']*'" "$STATE/deploy.log" | sed 's/^/  /' || true

echo "starting a process worker on pool '$POOL'"
nohup "$PREFECT" worker start --pool "$POOL" >"$STATE/worker.log" 2>&1 </dev/null &
WORKER_PID=$!
STARTED+=("$WORKER_PID")
for _ in $(seq 1 60); do
    kill -0 "$WORKER_PID" 2>/dev/null || { tail -n 30 "$STATE/worker.log" >&2; die "the worker exited"; }
    grep -q "started" "$STATE/worker.log" 2>/dev/null && break
    sleep 1
done

printf '%s %s\n' "$SERVER_PID" "$WORKER_PID" >"$STATE/pids"
trap - EXIT

cat <<EOF

sisaflow is served for the workspace $WS
  Prefect server  PID $SERVER_PID   UI and API at http://$HOST:$PORT   log $STATE/server.log
  process worker  PID $WORKER_PID   pool '$POOL'                      log $STATE/worker.log

To send prefect (and sisaflow) commands and events to this server:
  export PREFECT_API_URL=$PREFECT_API_URL
Stop both (PIDs also in $STATE/pids):
  kill $WORKER_PID $SERVER_PID
EOF
